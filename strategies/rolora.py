"""RoLoRA: alternate the factor that is trained and averaged, round by round.

Chen, Guo, Ju, Dalal, Zhu, Khisti, "Robust Federated Finetuning of LLMs via Alternating
Optimization of LoRA" (RoLoRA, NeurIPS 2025, arXiv:2502.01755). fedlora alternates by
round: in odd rounds every client keeps the global A (peft's lora_A, the down-projection)
frozen and trains B; in even rounds it keeps the global B frozen and trains A.
The frozen factor is common to all clients, so averaging the trained one is exact:

    odd rounds:  s (sum p_k B_k) A = sum p_k s B_k A
    even rounds: s B (sum p_k A_k) = sum p_k s B A_k

and each reply carries one factor (half of FedAvg's upload). The first round trains B:
peft starts B at zero, and with B = 0 the gradient of A is zero too. Clients train at
the global rank; the head is averaged by FedAvg every round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.strategies.api import (
    AdapterState,
    ClientPlan,
    ClientUpdate,
    LoraFactors,
    LoraStrategy,
    average_dense,
    complete_reply,
    state_from_dict,
    weighted_average,
)


def trains_b(server_round: int) -> bool:
    """Whether ``server_round`` (1-based) trains B (odd rounds) or A (even rounds)."""
    return server_round % 2 == 1


def alternate(
    updates: Sequence[ClientUpdate], weights: Sequence[float], current: AdapterState, b_round: bool
) -> dict[str, LoraFactors]:
    """The trained factor averaged, the frozen one kept, per module."""
    out = {}
    for module, f in current.factors.items():
        if b_round:
            b = weighted_average([u.state.factors[module].b for u in updates], weights)
            out[module] = LoraFactors(a=f.a, b=b)
        else:
            a = weighted_average([u.state.factors[module].a for u in updates], weights)
            out[module] = LoraFactors(a=a, b=f.b)
    return out


class RoLora(LoraStrategy):
    """Odd rounds: A frozen, B averaged; even rounds: B frozen, A averaged (exact)."""

    name = "rolora"
    description = "Alternating rounds: B averaged with A frozen, then A with B frozen (RoLoRA)"
    exact = True
    heterogeneous_ranks = False
    # none: a reply leaves out the frozen factor, which Flower's fixedclipping_mod refuses
    # (reply keys must equal the payload's), and server-side clipping pairs by position
    central_dp = frozenset()
    secure_sum = True  # aggregate reads the replies only through their weighted mean
    server_optimizer = True  # the aggregate is a point in the adapter's own coordinates

    def client_plan(self, server_round: int, node_id: int, rank: int) -> ClientPlan:
        """Freeze the factor this round does not train, and do not send it back."""
        b_round = trains_b(server_round)
        return ClientPlan(
            rank=rank,
            init_seed=self.seed,
            freeze_a=b_round,
            send_a=not b_round,
            freeze_b=not b_round,
            send_b=b_round,
        )

    def decode_update(
        self,
        server_round: int,
        plan: ClientPlan,
        tensors: Mapping[str, np.ndarray],
        current: AdapterState,
    ) -> AdapterState:
        """The trained factor from the reply, the frozen one from the global adapter."""
        frozen = "lora_A" if trains_b(server_round) else "lora_B"
        if any(frozen in k for k in tensors):
            raise ValueError(f"round {server_round} keeps {frozen} frozen; the reply sent it")
        return state_from_dict(complete_reply(tensors, current), self.scaling(plan.rank))

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """Average the factor this round trained; the head by weighted FedAvg."""
        factors = alternate(updates, weights, current, trains_b(server_round))
        return AdapterState(factors, average_dense(updates, weights), current.scaling)
