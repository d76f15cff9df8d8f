"""Low-rank stacks merged into the base weights: both ends of it, in one place.

FLoRA (and any strategy that writes the base, such as FedEx-LoRA's residual) sends a
node the stacks it has not merged yet under ``merge/<round>/<peft key>`` payload keys,
listed in its :class:`~fedlora.lora.plan.ClientPlan` (``merge_rounds``). The node merges
them into its base in round order (:meth:`NodeBase.merged`) and reports the last round it
merged and a fingerprint of its base (:meth:`NodeBase.report`); the server compares that
with its own merged base (:func:`base_disagreement`). Both ends merge with
:func:`merge_into_base`, so their bases agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedlora.lora.lowrank import fingerprint, merge_product
from fedlora.lora.state import A_SUFFIX, B_SUFFIX, AdapterError, AdapterState, state_from_dict

MERGE_PREFIX = "merge/"
"""Payload keys of the stacks a node merges: ``merge/<round>/<peft key>``."""
LAST_MERGED = "last-merged-round"
"""Reply metric: the last round whose stack the node has merged."""
BASE_FINGERPRINT = "base-fingerprint"
"""Reply metrics ``base-fingerprint-<i>``: :func:`~fedlora.lora.lowrank.fingerprint` of the base."""
FINGERPRINT_PROBES = 4
FINGERPRINT_RTOL = 1e-4
"""Relative tolerance between the server's and a node's fingerprint (float32 merges)."""


def merge_into_base(
    delta: Mapping[str, np.ndarray] | None, stack: AdapterState
) -> dict[str, np.ndarray]:
    """The base delta after merging ``stack`` (s B A per module) into ``delta``."""
    out = dict(delta or {})
    for module, f in stack.factors.items():
        out[module] = merge_product(out.get(module), stack.scaling, f.b, f.a)
    return out


def stack_payload(stacks: Mapping[int, AdapterState], rounds: Iterable[int]) -> dict:
    """The payload entries that carry the stacks of ``rounds`` (their LoRA factors)."""
    out: dict[str, np.ndarray] = {}
    for r in rounds:
        for key, value in stacks[r].to_state_dict().items():
            if key.endswith((A_SUFFIX, B_SUFFIX)):
                out[f"{MERGE_PREFIX}{r}/{key}"] = value
    return out


def without_stacks(received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The received tensors other than base-merge stacks (what the adapter loads)."""
    return {k: v for k, v in received.items() if not k.startswith(MERGE_PREFIX)}


@dataclass(frozen=True)
class NodeBase:
    """A node's merged base: the delta per module, and the last round merged into it."""

    delta: Mapping[str, np.ndarray] = field(default_factory=dict)
    last_merged: int = 0

    def merged(
        self,
        received: Mapping[str, np.ndarray],
        rounds: Iterable[int],
        scaling_of_rank: Callable[[int], float],
        *,
        reset: bool = False,
    ) -> NodeBase:
        """This base after merging the stacks of ``rounds`` found in ``received``, in order.

        Rounds at or before :attr:`last_merged` are already in and skipped; ``reset``
        starts again from the original base. This is the node half of FLoRA's catch-up.
        """
        out, last = ({}, 0) if reset else (dict(self.delta), self.last_merged)
        for r in rounds:
            if r <= last:
                continue
            prefix = f"{MERGE_PREFIX}{r}/"
            stack = state_from_dict(
                {k[len(prefix) :]: v for k, v in received.items() if k.startswith(prefix)}, 1.0
            )
            if not stack.factors:
                raise AdapterError(f"Stack of round {r} is missing from the payload")
            stack = AdapterState(stack.factors, {}, scaling_of_rank(stack.rank))
            out, last = merge_into_base(out, stack), r
        return NodeBase(out, last)

    def report(self) -> dict[str, float]:
        """What a node tells the server about its base, with every training reply."""
        metrics = {LAST_MERGED: float(self.last_merged)}
        for i, value in enumerate(fingerprint(self.delta, FINGERPRINT_PROBES)):
            metrics[f"{BASE_FINGERPRINT}-{i}"] = value
        return metrics


def base_disagreement(
    metrics: Mapping[str, float], expected_round: int, expected: Mapping[str, np.ndarray]
) -> str | None:
    """Why a node's reported base differs from the server's ``expected`` one (None: agrees)."""
    last = int(metrics.get(LAST_MERGED, -1))
    if last != expected_round:
        return f"node merged up to round {last}, the server's base is at round {expected_round}"
    reported = [metrics.get(f"{BASE_FINGERPRINT}-{i}") for i in range(FINGERPRINT_PROBES)]
    want = fingerprint(expected, FINGERPRINT_PROBES)
    if any(v is None for v in reported) or not np.allclose(
        reported, want, rtol=FINGERPRINT_RTOL, atol=1e-6
    ):
        diff = max(abs((v or 0.0) - e) for v, e in zip(reported, want, strict=True))
        return f"base fingerprint differs from the server's by {diff:.3e}"
    return None


def fingerprint_distance(metrics: Mapping[str, float], expected: Mapping[str, np.ndarray]) -> float:
    """The largest difference between a node's reported fingerprint and ``expected``'s."""
    want = fingerprint(expected, FINGERPRINT_PROBES)
    reported = [metrics.get(f"{BASE_FINGERPRINT}-{i}", np.nan) for i in range(FINGERPRINT_PROBES)]
    return max(abs(a - b) for a, b in zip(reported, want, strict=True))


class MergeLedger:
    """The server's record of the stacks every node merges into its base weights.

    A strategy that moves part of each round's update into the nodes' base weights
    (FLoRA's stacks, FedEx-LoRA's residuals) keeps one. A node that missed rounds is sent
    every stack after the last one it reports merged ("catch-up"); a node whose merged
    base disagrees with the server's (its reply's fingerprint) is dropped for the round
    and reset (sent every stack again) in the next. ``merged`` is the sum of the stacks
    before the round under way: the base delta evaluation and export apply.
    """

    def __init__(self, catch_up: bool = True) -> None:
        self.catch_up = catch_up
        self.stacks: dict[int, AdapterState] = {}  # round -> stack of that round
        self.merged: dict[str, np.ndarray] = {}  # sum of stacks through merged_round
        self.merged_round = 0
        self.node_last_merged: dict[int, int] = {}
        self.node_reset: set[int] = set()

    def sync(self, server_round: int) -> None:
        """Fold every stored stack before ``server_round`` into the merged base."""
        for r in sorted(self.stacks):
            if self.merged_round < r < server_round:
                self.merged = merge_into_base(self.merged, self.stacks[r])
                self.merged_round = r

    def to_merge(self, server_round: int, node_id: int) -> tuple[tuple[int, ...], bool]:
        """The rounds whose stacks ``node_id`` merges before ``server_round``, and a reset.

        A reset: the node drops its merged base first.
        """
        self.sync(server_round)
        reset = node_id in self.node_reset
        last = 0 if reset else self.node_last_merged.get(node_id, 0)
        rounds = sorted(r for r in self.stacks if last < r < server_round)
        if not self.catch_up:
            rounds = rounds[-1:]
        return tuple(rounds), reset

    def record(self, server_round: int, stack: AdapterState) -> None:
        """The stack of ``server_round`` (merged by every node from the next round on)."""
        self.stacks[server_round] = stack

    def accept(self, server_round: int, node_id: int, metrics: Mapping[str, float]) -> str | None:
        """Drop (and reset) a node whose merged base disagrees with the server's."""
        self.node_last_merged[node_id] = max(int(metrics.get(LAST_MERGED, -1)), 0)
        expected_round = max((r for r in self.stacks if r < server_round), default=0)
        why = base_disagreement(metrics, expected_round, self.merged)
        if why is not None:
            self.node_reset.add(node_id)
            return why
        self.node_reset.discard(node_id)
        return None

    def worst_distance(self, metrics: Iterable[Mapping[str, float]]) -> float:
        """The largest fingerprint distance between a node's base and the server's."""
        return max((fingerprint_distance(m, self.merged) for m in metrics), default=0.0)

    def state_dict(self) -> dict:
        """Stacks and each node's last merged round (JSON values and numpy arrays)."""
        return {
            "merged_round": self.merged_round,
            "node_last_merged": {str(k): v for k, v in self.node_last_merged.items()},
            "node_reset": sorted(self.node_reset),
            "stacks": {
                str(r): {"scaling": s.scaling, "tensors": s.to_state_dict()}
                for r, s in self.stacks.items()
            },
        }

    def load_state_dict(self, state: Mapping) -> int:
        """Restore :meth:`state_dict` and rebuild the merged base; the round it reached."""
        self.stacks = {
            int(r): state_from_dict(
                {k: np.asarray(v, np.float32) for k, v in s["tensors"].items()}, float(s["scaling"])
            )
            for r, s in state.get("stacks", {}).items()
        }
        self.node_last_merged = {
            int(k): int(v) for k, v in state.get("node_last_merged", {}).items()
        }
        self.node_reset = {int(n) for n in state.get("node_reset", [])}
        self.merged, self.merged_round = {}, 0
        target = int(state.get("merged_round", 0))
        self.sync(target + 1)
        return self.merged_round
