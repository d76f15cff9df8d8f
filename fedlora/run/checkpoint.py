"""Checkpoints: the global adapter in PEFT format plus the run's own state.

Each round is written to a temporary folder and renamed into place, so a crash never
leaves a half-written checkpoint under a final name. ``adapter_model.safetensors`` +
``adapter_config.json`` load with ``PeftModel.from_pretrained``; ``state.json`` holds
the round number, the strategy state and a digest of the adapter file, checked on load
so a corrupt or mismatched checkpoint fails loudly instead of being used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedlora.lora.state import AdapterState, state_from_dict
from fedlora.model.peft_state import load_into_peft

ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "state.json"
ARRAYS_FILE = "state_arrays.safetensors"
_ARRAY_REF = "__array__"
RESUMABLE_CHANGES = frozenset(
    {
        "num-server-rounds",
        "resume",
        "round-timeout",
        "max-message-mib",
        "keep-checkpoints",
        "tracking",
    }
)
"""Run-config keys that may differ between a checkpoint's run and its resumption."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not belong to this run."""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(
    folder: Path, model: PeftModel, state: AdapterState, meta: dict[str, Any]
) -> Path:
    """Write the adapter (PEFT format) and ``meta`` atomically to ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    load_into_peft(model, state)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(str(tmp))
        arrays: dict[str, np.ndarray] = {}
        record = _split_arrays(dict(meta), arrays, "")
        record["adapter_sha256"] = _digest(tmp / ADAPTER_FILE)
        record["scaling"] = state.scaling
        if arrays:
            save_file(arrays, str(tmp / ARRAYS_FILE))
            record["arrays_sha256"] = _digest(tmp / ARRAYS_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=_np))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_checkpoint(folder: Path) -> tuple[AdapterState, dict[str, Any]]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`."""
    state_path, adapter_path = folder / STATE_FILE, folder / ADAPTER_FILE
    if not state_path.is_file() or not adapter_path.is_file():
        raise CheckpointError(
            f"Checkpoint {folder} is incomplete (needs {STATE_FILE} and {ADAPTER_FILE})"
        )
    try:
        meta = json.loads(state_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"Checkpoint {folder}: {STATE_FILE} is corrupt ({err})") from err
    if meta.get("adapter_sha256") != _digest(adapter_path):
        raise CheckpointError(
            f"Checkpoint {folder}: {ADAPTER_FILE} does not match its recorded digest"
        )
    try:
        tensors = load_file(str(adapter_path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"Checkpoint {folder}: {ADAPTER_FILE} is unreadable ({err})") from err
    if "arrays_sha256" in meta:
        arrays_path = folder / ARRAYS_FILE
        if not arrays_path.is_file() or meta["arrays_sha256"] != _digest(arrays_path):
            raise CheckpointError(f"Checkpoint {folder}: {ARRAYS_FILE} is missing or corrupt")
        meta = _join_arrays(meta, load_file(str(arrays_path)))
    return state_from_dict(_peft_keys_to_state(tensors), float(meta.get("scaling", 1.0))), meta


def latest_checkpoint(folder: Path) -> Path:
    """The newest ``round-*`` checkpoint under ``folder`` (half-written ones are hidden).

    The newest is returned even if it is corrupt: :func:`load_checkpoint` then says so,
    rather than an older round being used without anyone deciding it.
    """
    rounds = sorted(p for p in folder.glob("round-*") if p.is_dir())
    if not rounds:
        raise CheckpointError(f"No checkpoint to resume from in {folder}")
    return rounds[-1]


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any], folder: Path) -> None:
    """Refuse a checkpoint written under a different run configuration.

    Only settings that do not change what a round computes may differ.
    """
    changed = sorted(
        k
        for k in set(saved) | set(current)
        if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)
    )
    if changed:
        diff = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:6])
        raise CheckpointError(
            f"Checkpoint {folder} belongs to another run configuration ({diff}); resume "
            f"with the same settings (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
        )


def serialise_state(state: dict[str, Any]) -> tuple[str, dict[str, np.ndarray]]:
    """A nested state dict as JSON text plus its numpy arrays (for safetensors)."""
    arrays: dict[str, np.ndarray] = {}
    text = json.dumps(_split_arrays(state, arrays, ""), sort_keys=True, default=_np)
    return text, arrays


def restore_state(text: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of :func:`serialise_state`."""
    return _join_arrays(json.loads(text), arrays)


def _split_arrays(value: Any, arrays: dict[str, np.ndarray], path: str) -> Any:
    """Replace numpy arrays in a nested dict by references; collect them in ``arrays``."""
    if isinstance(value, np.ndarray):
        arrays[path] = np.ascontiguousarray(value)
        return {_ARRAY_REF: path}
    if isinstance(value, dict):
        return {k: _split_arrays(v, arrays, f"{path}/{k}") for k, v in value.items()}
    return value


def _join_arrays(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY_REF}:
            return arrays[value[_ARRAY_REF]]
        return {k: _join_arrays(v, arrays) for k, v in value.items()}
    return value


def _peft_keys_to_state(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Peft saves keys without the adapter name; our keys are identical, keep as is."""
    return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def _np(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Cannot serialise {type(value).__name__} in checkpoint state")
