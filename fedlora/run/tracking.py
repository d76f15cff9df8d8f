"""Optional experiment tracking: the per-round record as TensorBoard or MLflow scalars.

Off by default; neither package is a dependency. The tracker is chosen once, at the
start of a run, so a missing package fails before any round with the package to
install, not after an hour of training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path
from typing import Any, Protocol

from flwr.supercore import log

from fedlora.config import ConfigError

# record keys worth a curve (others are lists, strings or per-node detail)
SCALARS = (
    "eval_accuracy",
    "eval_loss",
    "train_loss",
    "aggregation_error",
    "bytes_up",
    "bytes_down",
    "seconds",
)


class Tracker(Protocol):
    """Receives every round record; closed once at the end of the run."""

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Record one round (called after the record is written to rounds.jsonl)."""

    def close(self, failed: bool = False) -> None:
        """Flush and release whatever the tracker holds; ``failed``: the run raised."""


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a round record to plot, including the strategy's own metrics."""
    out = {k: float(record[k]) for k in SCALARS if isinstance(record.get(k), int | float)}
    for key, value in (record.get("metrics") or {}).items():
        if isinstance(value, int | float):
            out[f"strategy/{key}"] = float(value)
    epsilons = [n["epsilon"] for n in record.get("nodes", []) if n.get("epsilon") is not None]
    if epsilons:
        out["dp/max_epsilon"] = float(max(epsilons))
    return out


class _Writer(Protocol):
    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


class _Guarded:
    """A tracker that never stops the run: a failing backend is warned about and dropped.

    It also keeps the largest epsilon so far, so that curve never goes down when a round
    samples nodes that have spent less.
    """

    def __init__(self, writer: _Writer | None) -> None:
        self.writer = writer
        self.max_epsilon: float | None = None

    def log_round(self, record: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        scalars = round_scalars(record)
        if "dp/max_epsilon" in scalars:
            self.max_epsilon = max(self.max_epsilon or 0.0, scalars["dp/max_epsilon"])
        if self.max_epsilon is not None:
            scalars["dp/max_epsilon"] = self.max_epsilon
        try:
            self.writer.log_scalars(int(record["round"]), scalars)
        except Exception as err:
            log(WARNING, "Experiment tracking failed (%s); the run goes on without it", err)
            self.writer = None

    def close(self, failed: bool = False) -> None:
        if self.writer is None:
            return
        try:
            self.writer.close(failed)
        except Exception as err:
            log(WARNING, "Closing the experiment tracker failed: %s", err)
        self.writer = None


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as err:
            raise ConfigError(
                "Invalid value for 'tracking': 'tensorboard' needs the tensorboard or "
                "tensorboardX package (pip install tensorboard)"
            ) from err
    return SummaryWriter


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError as err:
        raise ConfigError(
            "Invalid value for 'tracking': 'mlflow' needs the mlflow package (pip install mlflow)"
        ) from err
    return mlflow


def _wandb() -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ConfigError(
            "Invalid value for 'tracking': 'wandb' needs the wandb package (pip install wandb)"
        ) from err
    return wandb


def check_available(kind: str) -> None:
    """Raise :class:`ConfigError` now if the package ``kind`` needs is not installed."""
    if kind == "tensorboard":
        _summary_writer()
    elif kind == "mlflow":
        _mlflow()
    elif kind == "wandb":
        _wandb()


class _TensorBoard:
    def __init__(self, folder: Path) -> None:
        self.writer = _summary_writer()(log_dir=str(folder))

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, folder: Path, params: Mapping[str, Any]) -> None:
        mlflow = _mlflow()
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(folder.resolve().as_uri())
        self.mlflow = mlflow
        mlflow.start_run(run_name=Path(str(params.get("output-dir", "fedlora"))).name)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.mlflow.log_metrics(dict(scalars), step=step)

    def close(self, failed: bool) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


class _WandB:
    """Weights & Biases, offline unless WANDB_MODE or WANDB_API_KEY says otherwise.

    Offline, the files go under output-dir/wandb (``wandb sync`` uploads them later);
    WANDB_PROJECT names the project.
    """

    def __init__(self, folder: Path, params: Mapping[str, Any]) -> None:
        wandb = _wandb()
        folder.mkdir(parents=True, exist_ok=True)
        online = os.environ.get("WANDB_MODE") or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline"
        )
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fedlora"),
            name=Path(str(params.get("output-dir", "fedlora"))).name,
            config=dict(params),
            dir=str(folder),
            mode=online,
        )

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def make_tracker(kind: str, output_dir: Path, params: Mapping[str, Any]) -> Tracker:
    """The tracker ``kind`` names (see the ``tracking`` run-config key)."""
    if kind == "tensorboard":
        return _Guarded(_TensorBoard(output_dir / "tensorboard"))
    if kind == "mlflow":
        return _Guarded(_MLflow(output_dir / "mlruns", params))
    if kind == "wandb":
        return _Guarded(_WandB(output_dir / "wandb", params))
    return _Guarded(None)
