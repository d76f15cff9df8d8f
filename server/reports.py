"""What the server records about a round: per-node outcomes, the round's report, its record.

A :class:`RoundReport` is built while a round runs; :func:`round_metrics` is its flat
numeric part (the MetricRecord Flower's ``aggregate_train`` returns) and
:func:`round_record` the line of ``rounds.jsonl``, which adds who took part and why the
others did not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlora.server.weights import Anomaly
from fedlora.strategies.api import ClientUpdate
from fedlora.wire import protocol

STATUSES = ("ok", "dropped", "error", "missing", "declined", "too-large")
"""ok: aggregated; dropped: a bad reply; error: the node failed; missing: no reply in time;
declined: the node refused (its privacy budget is spent); too-large: its payload exceeded
the message limit and was not sent."""


@dataclass(frozen=True)
class NodeOutcome:
    """What happened to one node in one round."""

    node_id: int
    status: str
    reason: str = ""
    num_examples: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    dense_down: int = 0  # the same payloads as dense float32, for comparison
    dense_up: int = 0
    weight: float | None = None  # its p_k in the aggregate (None: not aggregated)


@dataclass
class RoundReport:
    """Everything the server records about one training round."""

    server_round: int
    sampled: list[int] = field(default_factory=list)
    outcomes: list[NodeOutcome] = field(default_factory=list)
    skipped: bool = False
    skip_reason: str = ""
    strategy_error: str = ""
    aggregation_error: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    anomalies: list[Anomaly] = field(default_factory=list)  # claims the server cut

    @property
    def num_ok(self) -> int:
        """Number of replies that were aggregated."""
        return sum(o.status == "ok" for o in self.outcomes)

    def total(self, attribute: str) -> int:
        """The sum over nodes of one byte count (bytes_up, bytes_down, dense_up, dense_down)."""
        return sum(getattr(o, attribute) for o in self.outcomes)

    def skip(self, reason: str, strategy_error: str = "") -> None:
        """Mark the round skipped (the global adapter stays as it was)."""
        self.skipped, self.skip_reason, self.strategy_error = True, reason, strategy_error


def client_metrics(updates: Sequence[ClientUpdate], weights: np.ndarray) -> dict[str, float]:
    """The example-weighted train losses of the aggregated nodes, and the slowest node."""
    out: dict[str, float] = {}
    for key in (protocol.TRAIN_LOSS, protocol.TRAIN_LOSS_FIRST):
        values = [(w, u.metrics.get(key)) for u, w in zip(updates, weights, strict=True)]
        if all(v is not None and math.isfinite(v) for _, v in values):
            out[key] = float(sum(w * v for w, v in values))
    out["max-train-seconds"] = float(
        max(u.metrics.get(protocol.TRAIN_SECONDS, 0.0) for u in updates)
    )
    out["decode-seconds"] = float(sum(u.metrics.get("decode-seconds", 0.0) for u in updates))
    return out


def round_metrics(report: RoundReport) -> dict[str, float]:
    """The report's numbers, flat (what ``aggregate_train`` returns as a MetricRecord)."""
    numbers = {
        "num-ok": report.num_ok,
        "num-failed": len(report.outcomes) - report.num_ok,
        "bytes-up": report.total("bytes_up"),
        "bytes-down": report.total("bytes_down"),
        "dense-up": report.total("dense_up"),
        "dense-down": report.total("dense_down"),
        **({} if report.skipped else {"aggregation-error": report.aggregation_error}),
        **report.metrics,
    }
    return {k: float(v) for k, v in numbers.items() if math.isfinite(float(v))}


def node_record(o: NodeOutcome) -> dict[str, Any]:
    """One node's entry in a round record."""
    return {
        "node_id": o.node_id,
        "status": o.status,
        "reason": o.reason,
        "num_examples": o.num_examples,
        "bytes_up": o.bytes_up,
        "bytes_down": o.bytes_down,
        "dense_up": o.dense_up,
        "dense_down": o.dense_down,
        "encode_seconds": o.metrics.get("encode-seconds"),
        "train_loss": o.metrics.get(protocol.TRAIN_LOSS),
        "train_seconds": o.metrics.get(protocol.TRAIN_SECONDS),
        "process_seconds": o.metrics.get(protocol.PROCESS_SECONDS),
        "handler_seconds": o.metrics.get(protocol.HANDLER_SECONDS),
        "process_id": o.metrics.get(protocol.PROCESS_ID),
        "process_peak_mib": o.metrics.get(protocol.PROCESS_PEAK_MIB),
        "epsilon": o.metrics.get(protocol.EPSILON),
        "weight": o.weight,
        **{  # CUDA nodes only: device memory at the job's start and peak (MiB)
            k.replace("-", "_"): o.metrics[k]
            for k in ("device-mib-start", "device-mib-peak")
            if k in o.metrics
        },
    }


def training_record(report: RoundReport, metrics: Mapping[str, float]) -> dict[str, Any]:
    """The training part of a round's record: the MetricRecord's numbers and the nodes."""
    return {
        "num_sampled": len(report.sampled),
        "num_ok": report.num_ok,
        "skipped": report.skipped,
        "skip_reason": report.skip_reason,
        "strategy_error": report.strategy_error,
        "aggregation_error": None if report.skipped else metrics.get("aggregation-error"),
        "train_loss": metrics.get(protocol.TRAIN_LOSS),
        "train_loss_first": metrics.get(protocol.TRAIN_LOSS_FIRST),
        "bytes_up": int(metrics.get("bytes-up", 0)),
        "bytes_down": int(metrics.get("bytes-down", 0)),
        "dense_up": int(metrics.get("dense-up", 0)),
        "dense_down": int(metrics.get("dense-down", 0)),
        "metrics": dict(report.metrics),
        "nodes": [node_record(o) for o in report.outcomes],
        "anomalies": [
            {"node_id": a.node_id, "claimed": a.claimed, "used": a.used, "reason": a.reason}
            for a in report.anomalies
        ],
    }
