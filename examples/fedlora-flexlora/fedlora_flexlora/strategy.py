"""FlexLoRA: aggregate the full update, then give it back as a truncated SVD.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources" (FlexLoRA, 2024). The server forms the ideal update
dW* = sum_k p_k s_k B_k A_k per module, takes its truncated SVD at the global rank
(``lora-rank``), and every client receives the leading r_k components at its own rank.
The SVD keeps the components in order of importance, so the default payload of
``LoraStrategy`` (truncation to r_k) is exactly FlexLoRA's redistribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.strategies.api import (
    AdapterState,
    ClientUpdate,
    LoraFactors,
    LoraStrategy,
    average_dense,
    truncated_svd,
)


def flex_aggregate(
    updates: Sequence[ClientUpdate], weights: np.ndarray, rank: int, scaling: float
) -> dict[str, LoraFactors]:
    """Per module: B, A with s B A the best rank-``rank`` approximation of dW*."""
    out = {}
    for module in sorted(updates[0].state.factors):
        delta = sum(
            float(w)
            * u.state.scaling
            * (u.state.factors[module].b.astype(np.float64) @ u.state.factors[module].a)
            for u, w in zip(updates, weights, strict=True)
        )
        b, a, _ = truncated_svd(delta / scaling, rank)
        out[module] = LoraFactors(a=a, b=b)
    return out


class FlexLora(LoraStrategy):
    """SVD of the weighted product sum, truncated to each client's rank."""

    name = "flexlora_example"  # the entry point's name (`flexlora` is the built-in)
    description = "SVD of sum p_k s_k B_k A_k, redistributed at each client's rank (FlexLoRA)"
    exact = False  # exact only when the SVD truncation loses nothing
    heterogeneous_ranks = True

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """Truncated SVD of dW* per module; the head by weighted FedAvg."""
        factors = flex_aggregate(updates, weights, current.rank, current.scaling)
        dense = average_dense(updates, weights)
        return AdapterState(factors, dense, current.scaling)
