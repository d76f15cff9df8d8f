"""FedAvg on LoRA (FedIT): average A and B separately.

Zhang et al., "Towards Building the Next Generation of Multilingual/Federated GPT"
(FedIT, 2023). Clients start from the global (A, B), train both and send them back;
the server sets A = sum p_k A_k and B = sum p_k B_k. This is inexact: B A differs from
sum p_k B_k A_k whenever clients differ, and the base class measures that error every
round. Heterogeneous ranks are handled HetLoRA-style: zero-pad to the global rank to
aggregate, truncate to r_k when sending down (inexact too).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.strategies.api import (
    AdapterState,
    ClientUpdate,
    LoraFactors,
    LoraStrategy,
    resize_rank,
    weighted_average,
)


def fedavg_factors(
    factors: Sequence[LoraFactors], weights: Sequence[float], rank: int
) -> LoraFactors:
    """Weighted average of A and of B after zero-padding/truncating each to ``rank``.

    Scalings must already be equal (or folded into B); see :func:`fold_scaling`.
    """
    resized = [resize_rank(f, rank) for f in factors]
    return LoraFactors(
        a=weighted_average([f.a for f in resized], weights),
        b=weighted_average([f.b for f in resized], weights),
    )


def fold_scaling(factors: LoraFactors, from_scaling: float, to_scaling: float) -> LoraFactors:
    """Rescale B so that to_scaling * B' A == from_scaling * B A (for mixed ranks)."""
    if from_scaling == to_scaling:
        return factors
    return LoraFactors(a=factors.a, b=(factors.b * (from_scaling / to_scaling)).astype(np.float32))


def fedavg_states(
    states: Sequence[AdapterState], weights: Sequence[float], rank: int, scaling: float
) -> AdapterState:
    """FedAvg of whole adapters: LoRA factors at ``rank``/``scaling`` and dense tensors."""
    modules = sorted(states[0].factors)
    factors = {
        m: fedavg_factors(
            [fold_scaling(s.factors[m], s.scaling, scaling) for s in states], weights, rank
        )
        for m in modules
    }
    dense = {
        k: weighted_average([s.dense[k] for s in states], weights) for k in sorted(states[0].dense)
    }
    return AdapterState(factors=factors, dense=dense, scaling=scaling)


class FedAvg(LoraStrategy):
    """Weighted FedAvg of the LoRA factors (and of the trainable head)."""

    name = "fedavg"
    description = "FedAvg of A and B separately (FedIT); inexact, error measured"
    exact = False
    heterogeneous_ranks = True
    central_dp = frozenset({"client", "server"})  # a plain mean of everything the nodes send
    secure_sum = True  # aggregate reads the replies only through their weighted mean
    server_optimizer = True  # its aggregate is a point in the global adapter's coordinates

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """A = sum p_k A_k, B = sum p_k B_k (ranks padded to the global rank)."""
        return fedavg_states([u.state for u in updates], weights, current.rank, current.scaling)
