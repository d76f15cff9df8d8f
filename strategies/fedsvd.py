"""FedSVD: clients train B only; the server re-factorises B A by SVD every round.

After Lee, Park, Lee, Wagner, Seong, Bocklet, Lee, Hwang, *FedSVD: Adaptive
Orthogonalization for Private Federated Learning with LoRA* (NeurIPS 2025,
arXiv:2505.12805). A has orthonormal rows and is frozen on every client, so averaging B is
exact: s (sum p_k B_k) A = sum p_k s B_k A. The server then re-factorises the product:
with the thin SVD B_bar = U S W^T,

    B_bar A = U S (W^T A)   ->   A' = W^T A,  B' = U S

A' has orthonormal rows again (W is orthogonal and A's rows are orthonormal), the
product is unchanged (exact), and A' is the product's own right singular basis, so the
next round's frozen A adapts to what the clients learned (unlike FFA-LoRA's fixed
seeded A). Only the d_out x r matrix B_bar is decomposed: no d x d matrix is formed.
Each reply carries B only (half of FedAvg's upload); the download is A and B. Under
DP-SGD only B carries noise, and a frozen A with orthonormal rows does not amplify it.
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
    complete_reply,
    state_from_dict,
    weighted_average,
)


def orthonormal_rows(factors: LoraFactors) -> LoraFactors:
    """The same product B A with A's rows orthonormal (A^T = Q R: A' = Q^T, B' = B R^T)."""
    q, r = np.linalg.qr(np.asarray(factors.a, np.float64).T)
    b = np.asarray(factors.b, np.float64) @ r.T
    return LoraFactors(a=q.T.astype(np.float32), b=b.astype(np.float32))


def refactorise(b_bar: np.ndarray, a: np.ndarray) -> LoraFactors:
    """B' = U S and A' = W^T A from the thin SVD B_bar = U S W^T (so B' A' = B_bar A)."""
    u, s, wt = np.linalg.svd(np.asarray(b_bar, np.float64), full_matrices=False)
    return LoraFactors(
        a=(wt @ np.asarray(a, np.float64)).astype(np.float32),
        b=(u * s).astype(np.float32),
    )


class FedSvd(LoraStrategy):
    """A frozen with orthonormal rows, B averaged, B A re-factorised by SVD (exact)."""

    name = "fedsvd"
    description = "B trained and averaged on a frozen orthonormal A, then B A re-factorised by SVD"
    exact = True
    heterogeneous_ranks = False
    central_dp = frozenset()  # the SVD is not a plain mean of what the nodes sent
    secure_sum = True  # aggregate reads the replies only through their weighted mean

    def initial_state(self, state: AdapterState) -> AdapterState:
        """The initial A with orthonormal rows (the product is kept)."""
        factors = {m: orthonormal_rows(f) for m, f in state.factors.items()}
        return AdapterState(factors, state.dense, state.scaling)

    def client_plan(self, server_round: int, node_id: int, rank: int) -> ClientPlan:
        """Train B only, on the received A; do not send A back."""
        return ClientPlan(rank=rank, init_seed=self.seed, freeze_a=True, send_a=False)

    def decode_update(
        self,
        server_round: int,
        plan: ClientPlan,
        tensors: Mapping[str, np.ndarray],
        current: AdapterState,
    ) -> AdapterState:
        """B_k from the reply; A from the global adapter (the node kept it frozen)."""
        if any(k.endswith(A_SUFFIX) for k in tensors):
            raise ValueError("a FedSVD reply carries lora_A, which the node keeps frozen")
        return state_from_dict(complete_reply(tensors, current), self.scaling(plan.rank))

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """B_bar = sum p_k B_k, then A', B' from the SVD of B_bar (the head by FedAvg)."""
        factors = {
            m: refactorise(weighted_average([u.state.factors[m].b for u in updates], weights), f.a)
            for m, f in current.factors.items()
        }
        return AdapterState(factors, average_dense(updates, weights), current.scaling)
