"""FedEx-LoRA: FedAvg of A and B, plus the residual that makes the update exact, in the base.

Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models" (ACL 2025). FedAvg's adapter s B_bar A_bar misses part
of the clients' average update; FedEx-LoRA folds the missing part into the frozen base:

    W <- W + sum_k p_k s_k B_k A_k - s B_bar A_bar,     adapter <- (A_bar, B_bar)

so base plus adapter equal the exact average of the clients' models, while clients go
on training the averaged factors (unlike FLoRA, which restarts them every round). The
residual has rank up to (K+1) r and reaches the nodes as a stack of factors,

    B_res = [B_1, ..., B_K, B_bar],   A_res = [c_1 A_1; ...; c_K A_K; -c A_bar]

(c_k = p_k s_k / s_res, c = s / s_res, s_res the scaling of rank (K+1) r), through the
same mechanism as FLoRA's stacks (:class:`~fedlora.strategies.api.MergeLedger`): a node
that missed rounds merges their residuals first, and one whose base disagrees with the
server's is dropped and reset. ``aggregation_error`` measures the adapter alone (it is
FedAvg's); each round also records ``exact-error``, that of base residual plus adapter,
which is float error. One rank for all clients; the head is averaged by FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.strategies.api import (
    AdapterState,
    ClientPlan,
    ClientUpdate,
    LoraFactors,
    LoraStrategy,
    MergeLedger,
    node_view,
    relative_error,
    stack_payload,
)
from fedlora.strategies.fedavg import fedavg_states


def residual_stack(
    updates: Sequence[ClientUpdate],
    weights: Sequence[float],
    average: AdapterState,
    scaling_of_rank: Any,
) -> AdapterState:
    """sum_k p_k s_k B_k A_k - s B_bar A_bar as one stack of factors (rank (K+1) r)."""
    rank = average.rank * (len(updates) + 1)
    s_res = float(scaling_of_rank(rank))
    factors = {}
    for m, f in average.factors.items():
        coefficients = [
            float(w) * u.state.scaling / s_res for u, w in zip(updates, weights, strict=True)
        ]
        a = [
            c * u.state.factors[m].a.astype(np.float64)
            for u, c in zip(updates, coefficients, strict=True)
        ]
        a.append(-(average.scaling / s_res) * f.a.astype(np.float64))
        b = [u.state.factors[m].b for u in updates] + [f.b]
        factors[m] = LoraFactors(
            a=np.concatenate(a, axis=0).astype(np.float32),
            b=np.concatenate(b, axis=1).astype(np.float32),
        )
    return AdapterState(factors, {}, s_res)


class FedExLora(LoraStrategy):
    """FedAvg of the factors; the residual to the exact average merged into every base."""

    name = "fedex_lora"
    description = "FedAvg of A and B plus the exact residual folded into the base (FedEx-LoRA)"
    exact = False  # the adapter alone is FedAvg's; base residual + adapter are exact
    heterogeneous_ranks = False
    merges_into_base = True

    @dataclass(frozen=True)
    class Settings:
        """``fedex-catch-up`` (default true): a node that missed rounds merges their residuals."""

        fedex_catch_up: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ledger = MergeLedger(catch_up=self.settings.fedex_catch_up)
        self._exact_error = 0.0

    def base_delta(self) -> Mapping[str, np.ndarray]:
        """The residuals merged so far (the base under the current global adapter)."""
        return self.ledger.merged

    def client_plan(self, server_round: int, node_id: int, rank: int) -> ClientPlan:
        """Train the global A and B after merging the residuals the node has not merged."""
        rounds, reset = self.ledger.to_merge(server_round, node_id)
        return ClientPlan(rank=rank, init_seed=self.seed, merge_rounds=rounds, reset_base=reset)

    def payload(
        self, server_round: int, node_id: int, plan: ClientPlan, current: AdapterState
    ) -> dict[str, np.ndarray]:
        """The global adapter and the residual stacks the node must merge."""
        view = node_view(current, plan.rank, self.scaling(plan.rank)).to_state_dict()
        return view | stack_payload(self.ledger.stacks, plan.merge_rounds)

    def accept_update(self, server_round: int, update: ClientUpdate) -> str | None:
        """Drop a node whose merged base disagrees with the server's (and reset it)."""
        return self.ledger.accept(server_round, update.node_id, update.metrics)

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """FedAvg of the factors; the residual of this round goes to the ledger."""
        average = fedavg_states([u.state for u in updates], weights, current.rank, current.scaling)
        residual = residual_stack(updates, weights, average, self.scaling)
        self.ledger.record(server_round, residual)
        target, approx = [], []
        for m in sorted(average.factors):
            target.append([
                (float(w) * u.state.scaling, u.state.factors[m].b, u.state.factors[m].a)
                for u, w in zip(updates, weights, strict=True)
            ])  # fmt: skip
            approx.append([
                (residual.scaling, residual.factors[m].b, residual.factors[m].a),
                (average.scaling, average.factors[m].b, average.factors[m].a),
            ])  # fmt: skip
        self._exact_error = relative_error(target, approx)
        return average

    def extra_round_metrics(
        self,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
        result: AdapterState,
    ) -> dict[str, float]:
        """The error of residual plus adapter (float error), the residual's rank, base agreement."""
        worst = self.ledger.worst_distance(u.metrics for u in updates)
        rank = self.ledger.stacks[max(self.ledger.stacks)].rank if self.ledger.stacks else 0
        return {
            "exact-error": self._exact_error,
            "residual-rank": float(rank),
            "base-fingerprint-max-diff": worst,
        }

    def state_dict(self) -> dict[str, Any]:
        """The residual stacks and each node's last merged round."""
        return {"fedex": self.ledger.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the ledger and rebuild the merged base."""
        self.ledger.load_state_dict(state.get("fedex", {}))
