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
from pathlib import Path
from typing import Any

import numpy as np
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.numpy import load_file

from fedlora.adapters import AdapterState, load_into_peft, state_from_dict

ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "state.json"


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
        record = dict(meta)
        record["adapter_sha256"] = _digest(tmp / ADAPTER_FILE)
        record["scaling"] = state.scaling
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
    return state_from_dict(_peft_keys_to_state(tensors), float(meta.get("scaling", 1.0))), meta


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
