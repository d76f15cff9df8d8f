"""Optional experiment tracking: what reaches TensorBoard, and clear errors."""

from __future__ import annotations

import importlib.util

import pytest

from fedlora.config import ConfigError, RunConfig
from fedlora.run.tracking import make_tracker, round_scalars
from tests.helpers import read_scalars

RECORD = {
    "round": 3,
    "eval_accuracy": 0.5,
    "eval_loss": 1.25,
    "aggregation_error": 0.0,  # a value, not a missing one
    "train_loss": None,  # missing: not plotted
    "metrics": {"fedavg-error": 0.2, "note": "text"},
    "nodes": [{"epsilon": 1.5}, {"epsilon": 2.5}, {"epsilon": None}],
}


def test_round_scalars_takes_numbers_strategy_metrics_and_worst_epsilon():
    assert round_scalars(RECORD) == {
        "eval_accuracy": 0.5,
        "eval_loss": 1.25,
        "aggregation_error": 0.0,
        "strategy/fedavg-error": 0.2,
        "dp/max_epsilon": 2.5,
    }


def test_tensorboard_writes_every_round(tmp_path):
    tracker = make_tracker("tensorboard", tmp_path, {})
    tracker.log_round(RECORD)
    tracker.log_round({**RECORD, "round": 4, "eval_accuracy": 0.75})
    tracker.close()
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["eval_accuracy"] == {3: 0.5, 4: 0.75}
    assert scalars["dp/max_epsilon"] == {3: 2.5, 4: 2.5}


def test_unknown_tracker_is_rejected_by_name():
    with pytest.raises(ConfigError, match="'tracking'.*'comet'"):
        RunConfig.from_mapping({"tracking": "comet"})


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow installed")
def test_missing_mlflow_fails_before_any_round(tmp_path):
    with pytest.raises(ConfigError, match="pip install mlflow"):
        make_tracker("mlflow", tmp_path, {})


def test_a_failing_backend_is_dropped_with_a_warning_and_epsilon_never_falls(caplog):
    from fedlora.run.tracking import _Guarded

    class Flaky:
        def __init__(self):
            self.calls = []

        def log_scalars(self, step, scalars):
            self.calls.append((step, dict(scalars)))
            if step == 5:
                raise ConnectionError("tracking server went away")

        def close(self, failed):
            raise AssertionError("a dropped backend is not closed again")

    writer = Flaky()
    tracker = _Guarded(writer)
    tracker.log_round(RECORD)  # epsilon 2.5
    tracker.log_round({**RECORD, "round": 4, "nodes": [{"epsilon": 1.0}]})
    assert writer.calls[1][1]["dp/max_epsilon"] == 2.5  # the running maximum
    with caplog.at_level("WARNING"):
        tracker.log_round({**RECORD, "round": 5})
        tracker.log_round({**RECORD, "round": 6})  # not sent: the backend was dropped
    assert [step for step, _ in writer.calls] == [3, 4, 5]
    assert "tracking server went away" in caplog.text
    tracker.close(failed=True)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb installed")
def test_missing_wandb_fails_before_any_round(tmp_path):
    with pytest.raises(ConfigError, match="pip install wandb"):
        make_tracker("wandb", tmp_path, {})
    assert RunConfig(tracking="wandb").tracking == "wandb"
