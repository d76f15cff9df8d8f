"""Resume: a run continued from its checkpoint equals the run that was never stopped."""

from __future__ import annotations

import pytest
from flwr.simulation import run_simulation
from safetensors.numpy import load_file

from fedlora.clients.app import app as client_app
from fedlora.config import ConfigError, RunConfig
from fedlora.run import results
from fedlora.run.checkpoint import CheckpointError, check_resumable, latest_checkpoint
from fedlora.server.app import make_server_app
from tests.helpers import tiny_run

BACKEND = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}}
COMPRESSED = {"uplink-density": 0.25, "uplink-values": "int8"}


def _simulate(overrides: dict) -> None:
    run_simulation(make_server_app(overrides), client_app, num_supernodes=3, backend_config=BACKEND)


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_resumed_run_equals_uninterrupted_run(tiny_model, tmp_path):
    """Stopped after round 2 of 4, continued with resume=latest: same adapter, same records.

    The uplink is compressed with error feedback, so the simulated nodes' residuals must
    come back too (from node-state-dir: a resumed simulation starts new nodes).
    """
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    extra = COMPRESSED | {"node-state-dir": str(tmp_path / "nodes-whole")}
    _simulate(tiny_run(tiny_model, whole, **{"num-server-rounds": 4}, **extra))
    extra = COMPRESSED | {"node-state-dir": str(tmp_path / "nodes-parts")}
    _simulate(tiny_run(tiny_model, parts, **{"num-server-rounds": 2}, **extra))
    _simulate(tiny_run(tiny_model, parts, **{"num-server-rounds": 4, "resume": "latest"}, **extra))
    assert (tmp_path / "nodes-parts" / "partition-0").is_dir()
    a, b = _adapter(whole), _adapter(parts)
    assert a.keys() == b.keys()
    for key in a:
        assert abs(a[key] - b[key]).max() <= 1e-5, key
    ra, rb = results.read_records(whole), results.read_records(parts)
    assert [r["round"] for r in rb] == [0, 1, 2, 3, 4]  # none lost, none repeated
    for x, y in zip(ra, rb, strict=True):
        assert x["eval_accuracy"] == y["eval_accuracy"]
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], rel=1e-5)
    assert [r["bytes_up"] for r in ra[1:]] == [r["bytes_up"] for r in rb[1:]]


@pytest.mark.slow  # the resumed-run equality test stays in the default suite
def test_resume_refuses_another_configuration_and_a_finished_run(tiny_model, tmp_path):
    out = tmp_path / "run"
    _simulate(tiny_run(tiny_model, out, **{"num-server-rounds": 1}))
    folder = latest_checkpoint(out / "checkpoints")
    saved = RunConfig.from_mapping(tiny_run(tiny_model, out)).to_mapping()
    check_resumable(saved, {**saved, "num-server-rounds": 9, "resume": "latest"}, folder)
    with pytest.raises(CheckpointError, match=r"lr: 0.02 -> 0.5"):
        check_resumable(saved, {**saved, "lr": 0.5}, folder)
    with pytest.raises(ConfigError, match="already holds round 1"):
        _simulate(tiny_run(tiny_model, out, **{"num-server-rounds": 1, "resume": "latest"}))


def test_latest_checkpoint_is_the_newest_complete_folder(tmp_path):
    for r in (1, 2):
        (tmp_path / f"round-000{r}").mkdir()
    (tmp_path / ".round-0003-tmp").mkdir()  # a half-written one is not a checkpoint
    assert latest_checkpoint(tmp_path).name == "round-0002"
    with pytest.raises(CheckpointError, match="No checkpoint"):
        latest_checkpoint(tmp_path / "empty")
