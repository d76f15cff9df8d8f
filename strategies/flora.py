"""FLoRA: stack fresh per-round adapters of any ranks; clients merge stacks into their base.

Wang, Shen, et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations" (NeurIPS 2024). Each round every selected client
starts a fresh LoRA of its own rank r_k (A_k from a seed the server also knows, B_k = 0),
trains it and sends (A_k, B_k). The server stacks instead of averaging:

    A_stack = [c_1 A_1; c_2 A_2; ...],  B_stack = [B_1, B_2, ...],  c_k = p_k s_k / s

with s the peft scaling of a rank-sum(r_k) adapter, so s B_stack A_stack =
sum p_k s_k B_k A_k exactly, for any mix of ranks. Every client merges each round's
stack into its base weights before training again.

Partial participation: a node that was not sampled in a round never saw that round's
stack. The server keeps every stack and sends a node all the rounds after the last one
it reports merged ("catch-up"); each reply carries a fingerprint of the node's merged
base, and a node whose base disagrees with the server's is dropped for the round and
reset (sent every stack again) in the next. The trainable head is averaged by FedAvg.
Downlink grows with the clients per round and with the rounds a node missed; the
results record it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np

from fedlora.strategies.api import (
    LAST_MERGED,
    AdapterState,
    ClientPlan,
    ClientUpdate,
    LoraFactors,
    LoraStrategy,
    average_dense,
    base_disagreement,
    fingerprint_distance,
    logger,
    merge_into_base,
    stack_payload,
    state_from_dict,
)


def stack_factors(factors: Sequence[LoraFactors], coefficients: Sequence[float]) -> LoraFactors:
    """A = [c_1 A_1; c_2 A_2; ...] (rows), B = [B_1, B_2, ...] (columns)."""
    a = np.concatenate(
        [c * f.a.astype(np.float64) for f, c in zip(factors, coefficients, strict=True)], axis=0
    )
    b = np.concatenate([f.b for f in factors], axis=1)
    return LoraFactors(a=a.astype(np.float32), b=b.astype(np.float32))


def round_seed(seed: int, server_round: int, node_id: int) -> int:
    """The seed of a node's fresh A_k in a round (the server can regenerate A_k)."""
    return int(np.random.SeedSequence([seed, server_round, node_id % (2**32)]).generate_state(1)[0])


class Flora(LoraStrategy):
    """Stacking of fresh per-round adapters; exact for any mix of ranks."""

    name = "flora"
    description = "Stack fresh per-round adapters, clients merge into base (FLoRA); exact"
    exact = True
    heterogeneous_ranks = True
    merges_into_base = True

    @dataclass(frozen=True)
    class Settings:
        """``flora-catch-up`` (default true).

        With false, a node receives only the latest stack, as in a naive implementation,
        and its base drifts from the server's after any round it missed: the fingerprint
        check then drops it.
        """

        flora_catch_up: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.catch_up = self.settings.flora_catch_up
        self.stacks: dict[int, AdapterState] = {}  # round -> stack of that round
        self.merged: dict[str, np.ndarray] = {}  # sum of stacks through merged_round
        self.merged_round = 0
        self.node_last_merged: dict[int, int] = {}
        self.node_reset: set[int] = set()

    # -- the base every node must hold at the start of a round ---------------
    def _sync(self, server_round: int) -> None:
        """Fold every stored stack before ``server_round`` into the server's merged base."""
        for r in sorted(self.stacks):
            if self.merged_round < r < server_round:
                self.merged = merge_into_base(self.merged, self.stacks[r])
                self.merged_round = r

    def base_delta(self) -> Mapping[str, np.ndarray]:
        """The merged base (sum of stacks before the current global adapter)."""
        return self.merged

    def client_plan(self, server_round: int, node_id: int, rank: int) -> ClientPlan:
        """Fresh adapter at r_k (A from a per-round seed) after merging missed stacks."""
        self._sync(server_round)
        last = 0 if node_id in self.node_reset else self.node_last_merged.get(node_id, 0)
        rounds = sorted(r for r in self.stacks if last < r < server_round)
        if not self.catch_up:
            rounds = rounds[-1:]
        return ClientPlan(
            rank=rank,
            reinit=True,
            init_seed=round_seed(self.seed, server_round, node_id),
            a_from_seed=True,
            merge_rounds=tuple(rounds),
            reset_base=node_id in self.node_reset,
        )

    def payload(
        self, server_round: int, node_id: int, plan: ClientPlan, current: AdapterState
    ) -> dict[str, np.ndarray]:
        """The stacks the node must merge, and the averaged dense tensors."""
        return stack_payload(self.stacks, plan.merge_rounds) | dict(current.dense)

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """Stack A rows (scaled by p_k s_k / s) and B columns; FedAvg the dense tensors."""
        total_rank = sum(u.plan.rank for u in updates)
        scaling = self.scaling(total_rank)
        coefficients = [
            float(w) * u.state.scaling / scaling for u, w in zip(updates, weights, strict=True)
        ]
        factors = {
            m: stack_factors([u.state.factors[m] for u in updates], coefficients)
            for m in sorted(current.factors)
        }
        dense = average_dense(updates, weights)
        stack = AdapterState(factors, dense, scaling)
        self.stacks[server_round] = stack
        return stack

    # -- base agreement ------------------------------------------------------
    def accept_update(self, server_round: int, update: ClientUpdate) -> str | None:
        """Drop a node whose merged base disagrees with the server's (and reset it)."""
        node = update.node_id
        self.node_last_merged[node] = max(int(update.metrics.get(LAST_MERGED, -1)), 0)
        expected_round = max((r for r in self.stacks if r < server_round), default=0)
        why = base_disagreement(update.metrics, expected_round, self.merged)
        if why is not None:
            self.node_reset.add(node)
            return why
        self.node_reset.discard(node)
        return None

    def extra_round_metrics(
        self,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
        result: AdapterState,
    ) -> dict[str, float]:
        """Stacked rank and the worst fingerprint distance among the aggregated nodes."""
        worst = max((fingerprint_distance(u.metrics, self.merged) for u in updates), default=0.0)
        return {"stack-rank": float(result.rank), "base-fingerprint-max-diff": worst}

    # -- checkpointing -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Stacks, merged base and each node's last merged round."""
        return {
            "flora": {
                "merged_round": self.merged_round,
                "node_last_merged": {str(k): v for k, v in self.node_last_merged.items()},
                "node_reset": sorted(self.node_reset),
                "stacks": {
                    str(r): {"scaling": s.scaling, "tensors": s.to_state_dict()}
                    for r, s in self.stacks.items()
                },
            }
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore stacks and rebuild the merged base from them."""
        flora = state.get("flora", {})
        self.stacks = {
            int(r): state_from_dict(
                {k: np.asarray(v, np.float32) for k, v in s["tensors"].items()}, float(s["scaling"])
            )
            for r, s in flora.get("stacks", {}).items()
        }
        self.node_last_merged = {
            int(k): int(v) for k, v in flora.get("node_last_merged", {}).items()
        }
        self.node_reset = {int(n) for n in flora.get("node_reset", [])}
        self.merged, self.merged_round = {}, 0
        target = int(flora.get("merged_round", 0))
        self._sync(target + 1)
        if self.merged_round != target:
            logger.log(
                WARNING, "FLoRA state: merged round %d rebuilt as %d", target, self.merged_round
            )
