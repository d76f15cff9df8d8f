"""FlexLoRA: the exact weighted update, redistributed as a truncated SVD at each rank.

Bai et al., "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources" (FlexLoRA, NeurIPS 2024). The server forms
dW* = sum_k p_k s_k B_k A_k per module and keeps its best rank-``lora-rank``
approximation (Eckart-Young); a client of rank r_k receives its leading r_k components,
which the default payload's truncation gives because the SVD orders them. Exact when
the truncation loses nothing (sum of ranks <= ``lora-rank``); the round records the
truncation error.

The built-in computes the SVD from the stacked factors (thin QR of the stacks, then an
SVD of the (sum r_k) x (sum r_k) core: :func:`~fedlora.strategies.api.lowrank_svd`), never
forming a d_out x d_in matrix. ``examples/fedlora-flexlora`` is the same method as a
plugin tutorial, written the simple way (it forms dW*).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedlora.strategies.api import (
    AdapterState,
    ClientUpdate,
    LoraFactors,
    LoraSpec,
    LoraStrategy,
    average_dense,
    lowrank_svd,
)


def flex_factors(
    updates: Sequence[ClientUpdate],
    weights: Sequence[float],
    module: str,
    rank: int,
    scaling: float,
) -> tuple[LoraFactors, float]:
    """B, A with s B A the best rank-``rank`` approximation of dW*, and the truncation error."""
    terms = [
        (float(w) * u.state.scaling / scaling, u.state.factors[module].b, u.state.factors[module].a)
        for u, w in zip(updates, weights, strict=True)
    ]
    if not any(c != 0.0 for c, _, _ in terms):  # nothing to decompose: keep the shape
        first = updates[0].state.factors[module]
        return LoraFactors(
            a=np.zeros((rank, first.a.shape[1]), np.float32),
            b=np.zeros((first.b.shape[0], rank), np.float32),
        ), 0.0
    b, a, error = lowrank_svd(terms, rank)
    return LoraFactors(a=a, b=b), error


class FlexLora(LoraStrategy):
    """Truncated SVD of sum p_k s_k B_k A_k, redistributed at each client's rank."""

    name = "flexlora"
    description = "SVD of sum p_k s_k B_k A_k, redistributed at each client's rank (FlexLoRA)"
    exact = False  # exact only when the SVD truncation loses nothing
    heterogeneous_ranks = True

    def __init__(self, lora: LoraSpec, *, seed: int = 0, settings: Any = None) -> None:
        super().__init__(lora, seed=seed, settings=settings)
        self._truncation: dict[str, float] = {}  # per module, of the last aggregate

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """Truncated SVD of dW* per module; the head by weighted FedAvg."""
        factors = {}
        for module in sorted(current.factors):
            factors[module], self._truncation[module] = flex_factors(
                updates, weights, module, current.rank, current.scaling
            )
        return AdapterState(factors, average_dense(updates, weights), current.scaling)

    def extra_round_metrics(
        self,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
        result: AdapterState,
    ) -> dict[str, float]:
        """The largest relative truncation error of the round's SVDs."""
        return {"truncation-error-max": max(self._truncation.values(), default=0.0)}
