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
    AdapterState,
    ClientPlan,
    ClientUpdate,
    LoraFactors,
    LoraStrategy,
    MergeLedger,
    average_dense,
    logger,
    stack_payload,
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
        self.ledger = MergeLedger(catch_up=self.settings.flora_catch_up)

    def base_delta(self) -> Mapping[str, np.ndarray]:
        """The merged base (sum of stacks before the current global adapter)."""
        return self.ledger.merged

    def client_plan(self, server_round: int, node_id: int, rank: int) -> ClientPlan:
        """Fresh adapter at r_k (A from a per-round seed) after merging missed stacks."""
        rounds, reset = self.ledger.to_merge(server_round, node_id)
        return ClientPlan(
            rank=rank,
            reinit=True,
            init_seed=round_seed(self.seed, server_round, node_id),
            a_from_seed=True,
            merge_rounds=rounds,
            reset_base=reset,
        )

    def payload(
        self, server_round: int, node_id: int, plan: ClientPlan, current: AdapterState
    ) -> dict[str, np.ndarray]:
        """The stacks the node must merge, and the averaged dense tensors."""
        return stack_payload(self.ledger.stacks, plan.merge_rounds) | dict(current.dense)

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
        self.ledger.record(server_round, stack)
        return stack

    # -- base agreement ------------------------------------------------------
    def accept_update(self, server_round: int, update: ClientUpdate) -> str | None:
        """Drop a node whose merged base disagrees with the server's (and reset it)."""
        return self.ledger.accept(server_round, update.node_id, update.metrics)

    def extra_round_metrics(
        self,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
        result: AdapterState,
    ) -> dict[str, float]:
        """Stacked rank and the worst fingerprint distance among the aggregated nodes."""
        worst = self.ledger.worst_distance(u.metrics for u in updates)
        return {"stack-rank": float(result.rank), "base-fingerprint-max-diff": worst}

    # -- checkpointing -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Stacks, merged base and each node's last merged round."""
        return {"flora": self.ledger.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore stacks and rebuild the merged base from them."""
        flora = state.get("flora", {})
        target = int(flora.get("merged_round", 0))
        reached = self.ledger.load_state_dict(flora)
        if reached != target:
            logger.log(WARNING, "FLoRA state: merged round %d rebuilt as %d", target, reached)
