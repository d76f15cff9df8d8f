"""FedRot-LoRA: each client rotates its factors onto the global A before upload; FedAvg.

After Zhang, Kim, Cha, Vikalo, *FedRot-LoRA: Mitigating Rotational Misalignment in
Federated LoRA* (ICML 2026, arXiv:2602.23638). A LoRA update B A is unchanged by
B A = (B R^T)(R A) for any orthogonal R, so two clients can learn the same update in
rotated coordinates and FedAvg of their factors then cancels part of it. Before
replying, every client replaces (A_k, B_k) by (R_k A_k, B_k R_k^T) with R_k the
orthogonal Procrustes solution that best maps A_k onto the global A it received
(:func:`~fedlora.strategies.api.procrustes_rotation`), so its update B_k A_k is exactly
what it trained; the server then averages A and B as
FedAvg does. The rotation runs on the client, asked for by the plan
(``ClientPlan(align_rotation=True)``): the same hook is open to any plugin.

``alignment``: ``"a"`` (the default) aligns A every round, as described above and in
the paper's A-only ablation. ``"alternate"`` is the authors' code's default: no alignment
in round 1, then A in even rounds and B (B_k R^T onto the received B) in odd ones.

Not exact (the factors' average is still not the average of the products), but with
the factors aligned the error is smaller; the round records it as for every strategy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedlora.strategies.api import AdapterState, ClientPlan, ClientUpdate, LoraStrategy
from fedlora.strategies.fedavg import fedavg_states


class FedRotLora(LoraStrategy):
    """Clients align their factors to the global A by an orthogonal rotation; FedAvg."""

    name = "fedrot_lora"
    description = "Clients rotate (A_k, B_k) onto the global A (Procrustes), then FedAvg"
    exact = False
    heterogeneous_ranks = True  # rotations are r_k x r_k; aggregation as FedAvg (padded)
    central_dp = frozenset({"client", "server"})  # a plain mean of everything the nodes send
    secure_sum = True  # aggregate reads the replies only through their weighted mean
    server_optimizer = True  # an unchanged adapter aligns to itself (R = I) and averages back

    @dataclass(frozen=True)
    class Settings:
        """``alignment``: ``a`` (align A every round) or ``alternate``.

        ``alternate`` is the authors' code's default: none in round 1, then A in even
        rounds and B in odd ones.
        """

        alignment: str = "a"

        def __post_init__(self) -> None:
            if self.alignment not in ("a", "alternate"):
                raise ValueError(
                    f"Invalid value for 'alignment': {self.alignment!r} (use a or alternate)"
                )

    def client_plan(self, server_round: int, node_id: int, rank: int) -> ClientPlan:
        """Train A and B; align them to the received A (or B) before replying."""
        if self.settings.alignment == "a":
            return ClientPlan(rank=rank, init_seed=self.seed, align_rotation=True)
        return ClientPlan(
            rank=rank,
            init_seed=self.seed,
            align_rotation=server_round > 1,
            align_factor="a" if server_round % 2 == 0 else "b",
        )

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """A = sum p_k R_k A_k, B = sum p_k B_k R_k^T (the clients applied R_k)."""
        return fedavg_states([u.state for u in updates], weights, current.rank, current.scaling)
