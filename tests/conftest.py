"""Shared fixtures: a tiny random BERT on disk, message builders, Flower env isolation."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# before anything imports huggingface_hub, which reads HF_HUB_OFFLINE once, at import
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from flwr.supercore.task_identity import TaskIdentity

from tests.helpers import make_tiny_bert, make_tiny_llama

# tests (and the Flower processes they start) cache tokenised data in a folder of their
# own, never in ~/.cache or a developer's FEDLORA_CACHE_DIR; removed at exit
_CACHE = tempfile.mkdtemp(prefix="fedlora-test-cache-")
os.environ["FEDLORA_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped on a machine without CUDA (the CI machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT classifier (20 labels) saved as a local model folder."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 Llama decoder with SmolLM2's tokenizer, saved as a local folder."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Flower needs a task identity before a Message can be built outside a runtime."""
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0
