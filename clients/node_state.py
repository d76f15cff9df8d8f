"""State a node must keep between messages, kept where Flower keeps it and on disk.

``context.state`` survives across rounds for a node in simulation and deployment, but
not a SuperNode restart; with a ``state-dir`` in the node config the same records are
also written to files there (atomically), and read back when the context is empty.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context
from safetensors.numpy import load_file, save_file

from fedlora.wire.records import from_arrayrecord, to_arrayrecord


class NodeStore:
    """Named arrays and small JSON-able dicts of one node."""

    def __init__(self, context: Context, state_dir: str | None) -> None:
        self.context = context
        self.folder = Path(state_dir) if state_dir else None

    def load(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and metadata saved under ``name`` (empty when none)."""
        records = self.context.state
        arrays_key, meta_key = _keys(name)
        if meta_key in records.config_records:
            config = records.config_records[meta_key]
            meta = json.loads(str(config["json"])) if "json" in config else {}
            arrays = (
                from_arrayrecord(records.array_records[arrays_key])
                if arrays_key in records.array_records
                else {}
            )
            return arrays, meta
        if self.folder is not None and (self.folder / f"{name}.json").is_file():
            meta = json.loads((self.folder / f"{name}.json").read_text())
            path = self.folder / f"{name}.safetensors"
            arrays = dict(load_file(str(path))) if path.is_file() else {}
            return arrays, meta
        return {}, {}

    def save(self, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Replace what is stored under ``name``."""
        arrays_key, meta_key = _keys(name)
        self.context.state[arrays_key] = to_arrayrecord(arrays)
        # ConfigRecord values are flat; nested metadata (an accountant history) goes as JSON
        self.context.state[meta_key] = ConfigRecord({"json": json.dumps(meta)})
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = self.folder / f"{name}.safetensors"
        if arrays:
            _atomic(
                tensors,
                lambda p: save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, p),
            )
        else:  # an empty save must not read back the arrays of an earlier one
            tensors.unlink(missing_ok=True)
        _atomic(self.folder / f"{name}.json", lambda p: Path(p).write_text(json.dumps(meta)))


def _keys(name: str) -> tuple[str, str]:
    """Record keys of a stored item: a RecordDict has one namespace for all record types."""
    return f"{name}.arrays", f"{name}.meta"


def _atomic(target: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
