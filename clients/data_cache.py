"""A node's tokenised data on disk, so a fresh ClientApp process skips preparing it.

In deployment Flower 1.39 starts a new ClientApp process for every message: without a
cache, each round would read the dataset, partition it and tokenise it again (about a
second alone, several when nodes share cores). The cache holds only what the node
derives from its own data, in safetensors (no pickle), keyed by everything that shapes
it; an unreadable or inconsistent file is rebuilt, never trusted.

Location: ``FEDLORA_CACHE_DIR`` if set, else ``<state-dir>/data-cache`` for a node with a
state directory, else ``~/.cache/fedlora/data``. ``FEDLORA_CACHE_DIR=off`` disables it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from logging import WARNING
from pathlib import Path

import torch
from flwr.supercore import log
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

from fedlora.data.files import file_stamp as file_stamp  # re-exported: the cache's keys
from fedlora.model.embedded_decoder import CACHE_ENV

_FIELDS = ("input_ids", "attention_mask", "labels")

Splits = tuple[TensorDataset, TensorDataset]


def cache_dir(state_dir: str | None) -> Path | None:
    """Where this node caches its data; None when caching is off."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return None if configured.lower() == "off" else Path(configured).expanduser()
    if state_dir:
        return Path(state_dir).expanduser() / "data-cache"
    return Path.home() / ".cache" / "fedlora" / "data"


def cache_key(parts: Sequence[object]) -> str:
    """A file name for ``parts`` (everything that shapes the tokenised data)."""
    text = json.dumps([str(p) for p in parts])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def load_or_build(folder: Path | None, key: str, build: Callable[[], Splits]) -> Splits:
    """The cached (train, test) data for ``key``, or ``build()`` stored for next time."""
    if folder is None:
        return build()
    path = folder / f"{key}.safetensors"
    if path.is_file():
        try:
            return _read(path)
        except Exception as err:  # a torn or foreign file: rebuild rather than trust it
            log(WARNING, "Data cache %s is unreadable (%s); rebuilding it", path, err)
    splits = build()
    try:
        _write(path, splits)
    except Exception as err:  # a read-only home or a full disk must not stop training
        log(WARNING, "Cannot write the data cache %s (%s); continuing without it", path, err)
    return splits


def _write(path: Path, splits: Splits) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{split}.{name}": t.contiguous()
        for split, data in zip(("train", "test"), splits, strict=True)
        for name, t in zip(_FIELDS, data.tensors, strict=True)
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read(path: Path) -> Splits:
    tensors = load_file(str(path))
    out = []
    for split in ("train", "test"):
        missing = [n for n in _FIELDS if f"{split}.{n}" not in tensors]
        if missing:
            raise ValueError(f"no tensor {split}.{missing[0]}")
        ids, mask, labels = (tensors[f"{split}.{n}"] for n in _FIELDS)
        if not (ids.shape == mask.shape and ids.shape[0] == labels.shape[0]):
            raise ValueError(
                f"{split}: input_ids {tuple(ids.shape)}, attention_mask {tuple(mask.shape)} "
                f"and labels {tuple(labels.shape)} disagree"
            )
        if ids.dtype != torch.long or labels.dtype != torch.long:
            raise ValueError(f"{split}: expected int64 tensors, got {ids.dtype}/{labels.dtype}")
        out.append(TensorDataset(ids, mask, labels))
    return out[0], out[1]
