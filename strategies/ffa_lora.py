"""FFA-LoRA: A frozen at a seeded initialisation shared by all, only B trained and sent.

Sun, Qin, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning"
(ICLR 2024). Every client regenerates the same A from the run's seed
(:func:`fedlora.lora.seeded.seeded_a`), so A is never transmitted; B starts at zero and is
the only trained factor. Since A is common, B = sum p_k B_k aggregates exactly:
s B A = sum p_k s B_k A. Communication is halved versus FedAvg on LoRA, and under DP-SGD
the noise lands on B only.

Heterogeneous ranks stay exact: client k uses the first r_k rows of one seeded
A_max (r_max x d_in); the server folds s_k / s into B_k and zero-pads it to r_max, so
s B A_max = sum p_k s_k B_k A_k.

Alpha: A is not trained, so the paper scales the update up; it reports accuracy that
is stable over a wide range of alpha. In fedlora raise ``lora-alpha`` (about 8x the
FedAvg value, for example 128 at r=8) or the learning rate (about 10x); the
benchmarks measure both. The trainable classification head is averaged with FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.strategies.api import (
    A_SUFFIX,
    AdapterState,
    ClientPlan,
    ClientUpdate,
    LoraFactors,
    LoraStrategy,
    average_dense,
    node_view,
    seeded_a,
    state_from_dict,
    weighted_average,
)


def aggregate_b(
    bs: Sequence[np.ndarray],
    scalings: Sequence[float],
    weights: Sequence[float],
    rank: int,
    scaling: float,
) -> np.ndarray:
    """sum_k p_k (s_k / s) pad(B_k): exact when every A_k is a row prefix of A_max."""
    padded = []
    for b, s_k in zip(bs, scalings, strict=True):
        full = np.zeros((b.shape[0], rank), dtype=np.float32)
        full[:, : b.shape[1]] = b * (s_k / scaling)
        padded.append(full)
    return weighted_average(padded, weights)


class FfaLora(LoraStrategy):
    """Frozen seeded A, trained and averaged B (exact, half the traffic of FedAvg)."""

    name = "ffa_lora"
    description = "Frozen seeded A, B trained and averaged (FFA-LoRA); exact, A never sent"
    exact = True
    heterogeneous_ranks = True
    central_dp = frozenset({"client"})  # B is a plain mean; replies lack A, so not "server"
    secure_sum = True  # aggregate reads the replies only through their weighted mean
    server_optimizer = True  # its aggregate is a point in the global adapter's coordinates

    def initial_state(self, state: AdapterState) -> AdapterState:
        """A from the shared seed at the global rank, B = 0."""
        factors = {
            m: LoraFactors(
                a=seeded_a(m, f.rank, f.a.shape[1], self.seed),
                b=np.zeros_like(f.b),
            )
            for m, f in state.factors.items()
        }
        return AdapterState(factors, state.dense, state.scaling)

    def restore_fixed(self, state: AdapterState) -> AdapterState:
        """A from the seed, whatever the record held: the nodes regenerate it from the seed."""
        factors = {
            m: LoraFactors(a=seeded_a(m, f.rank, f.a.shape[1], self.seed), b=f.b)
            for m, f in state.factors.items()
        }
        return AdapterState(factors, state.dense, state.scaling)

    def client_plan(self, server_round: int, node_id: int, rank: int) -> ClientPlan:
        """Train B only; A is the first r_k rows of the seeded A, never sent."""
        return ClientPlan(
            rank=rank,
            freeze_a=True,
            init_seed=self.seed,
            a_from_seed=True,
            send_a=False,
        )

    def payload(
        self, server_round: int, node_id: int, plan: ClientPlan, current: AdapterState
    ) -> dict[str, np.ndarray]:
        """B (rescaled and truncated to r_k) and the dense tensors; no A."""
        view = node_view(current, plan.rank, self.scaling(plan.rank)).to_state_dict()
        return {k: v for k, v in view.items() if not k.endswith(A_SUFFIX)}

    def decode_update(
        self,
        server_round: int,
        plan: ClientPlan,
        tensors: Mapping[str, np.ndarray],
        current: AdapterState,
    ) -> AdapterState:
        """Rebuild each A_k from the seed; the reply carries B_k and the dense tensors."""
        if any(k.endswith(A_SUFFIX) for k in tensors):
            raise ValueError("FFA-LoRA reply carries lora_A, which must never be sent")
        full = dict(tensors)
        for module, f in current.factors.items():
            full[module + A_SUFFIX] = seeded_a(module, plan.rank, f.a.shape[1], self.seed)
        return state_from_dict(full, self.scaling(plan.rank))

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """B = sum p_k (s_k / s) pad(B_k); A unchanged; dense tensors by FedAvg."""
        factors = {
            m: LoraFactors(
                a=f.a,
                b=aggregate_b(
                    [u.state.factors[m].b for u in updates],
                    [u.state.scaling for u in updates],
                    weights,
                    f.rank,
                    current.scaling,
                ),
            )
            for m, f in current.factors.items()
        }
        dense = average_dense(updates, weights)
        return AdapterState(factors, dense, current.scaling)
