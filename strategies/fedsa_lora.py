"""FedSA-LoRA: every node trains A and B, only A is shared and averaged, B stays local.

Guo, Zeng, Wang, Fan, Wang, Qu, "Selective Aggregation for Low-Rank Adaptation in
Federated Learning" (FedSA-LoRA, ICLR 2025, arXiv:2410.01463). The paper finds that the
A factors (peft's lora_A, the down-projection) learn what the clients share and the B
factors what is specific to each, so:

    down:   the global A (and the dense tensors), never a B
    node k: starts from the global A and its own B_k of its last round (zero the first
            time, peft's init), trains both, keeps the trained B_k, sends A_k
    server: A = sum_k p_k A_k ; the server holds no B

Each node's model after the round is s B_k A. There is no single global product, so the
server records no aggregation error; it reports instead how far the nodes' A_k spread
around their average (``a-spread``: sum_k p_k ||A_k - A||^2 / sum_k p_k ||A_k||^2, the
squared relative distance, 0 when the nodes agree on A). The trainable dense tensors (a
classification head) are averaged by weighted FedAvg as in every strategy.

The server's copy of the adapter keeps B = 0 (the decoded replies too), so every server
check, checkpoint and export stays a valid adapter: the global A with a zero B, a model
that equals the base with the averaged head. The run is evaluated by federated
evaluation only (``personal_factors``): each node evaluates the global A with its own B
on its own test split (``ClientPlan.local_b``). Each node keeps its B in its store
(``local-b``; on disk in its ``state-dir`` when it has one), so its personal adapter is
the exported adapter with lora_B taken from there.

A is a weighted mean of what the nodes sent, so central DP (Flower's client-side
clipping) and SecAgg+ compose; a server optimiser steps A alone (B stays 0). Clients
train at the global rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.strategies.api import (
    B_SUFFIX,
    AdapterState,
    ClientPlan,
    ClientUpdate,
    LoraFactors,
    LoraStrategy,
    average_dense,
    state_from_dict,
    weighted_average,
)

A_SPREAD = "a-spread"
"""Round metric: sum_k p_k ||A_k - A||^2 / sum_k p_k ||A_k||^2 over all modules."""


def average_a(
    updates: Sequence[ClientUpdate], weights: Sequence[float], current: AdapterState
) -> dict[str, LoraFactors]:
    """A = sum_k p_k A_k per module; B = 0 (the server holds none)."""
    return {
        m: LoraFactors(
            a=weighted_average([u.state.factors[m].a for u in updates], weights),
            b=np.zeros_like(f.b),
        )
        for m, f in current.factors.items()
    }


def a_spread(
    a_by_node: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    average: Mapping[str, np.ndarray],
) -> float:
    """sum_k p_k ||A_k - A||^2 / sum_k p_k ||A_k||^2, summed over modules (0: no A)."""
    num = den = 0.0
    for a_k, w in zip(a_by_node, weights, strict=True):
        for m, a in a_k.items():
            x = np.asarray(a, np.float64)
            num += float(w) * float(np.sum((x - np.asarray(average[m], np.float64)) ** 2))
            den += float(w) * float(np.sum(x**2))
    return num / den if den > 0 else 0.0


def zero_b(state: AdapterState) -> AdapterState:
    """``state`` with every lora_B set to zero."""
    factors = {m: LoraFactors(f.a, np.zeros_like(f.b)) for m, f in state.factors.items()}
    return AdapterState(factors, state.dense, state.scaling)


class FedSaLora(LoraStrategy):
    """A averaged and shared, each node's B kept local (FedSA-LoRA); the head by FedAvg."""

    name = "fedsa_lora"
    description = "Share and average A only, each node keeps its own B (FedSA-LoRA)"
    exact = False  # no single global product: node k's model s B_k A is not s B_k A_k
    heterogeneous_ranks = False  # every node's B must fit the one global A
    central_dp = frozenset({"client"})  # A and the head are a plain mean; replies lack B
    server_optimizer = True  # A is a point in its own coordinates; B stays 0
    secure_sum = True  # aggregate reads the replies only through their weighted mean
    personal_factors = True  # B is each node's own: no server evaluation, no global product

    def initial_state(self, state: AdapterState) -> AdapterState:
        """The fresh adapter with B = 0 (peft's init; the server never holds another B)."""
        return zero_b(state)

    def restore_fixed(self, state: AdapterState) -> AdapterState:
        """B = 0 again, whatever the record held (central DP's noise lands on every tensor)."""
        return zero_b(state)

    def client_plan(self, server_round: int, node_id: int, rank: int) -> ClientPlan:
        """Train A and the node's own B; keep B, reply with A (and the dense tensors)."""
        return ClientPlan(rank=rank, init_seed=self.seed, send_b=False, local_b=True)

    def evaluation_plan(self, server_round: int, node_id: int, rank: int) -> ClientPlan:
        """Evaluate the global A with the node's own B (zero if it never trained)."""
        return ClientPlan(rank=rank, init_seed=self.seed, send_b=False, local_b=True)

    def payload(
        self, server_round: int, node_id: int, plan: ClientPlan, current: AdapterState
    ) -> dict[str, np.ndarray]:
        """The global A and the dense tensors; no B (the node uses its own)."""
        return {k: v for k, v in current.to_state_dict().items() if not k.endswith(B_SUFFIX)}

    def decode_update(
        self,
        server_round: int,
        plan: ClientPlan,
        tensors: Mapping[str, np.ndarray],
        current: AdapterState,
    ) -> AdapterState:
        """The reply's A_k and dense tensors, with B = 0: the server never sees B_k."""
        if any(k.endswith(B_SUFFIX) for k in tensors):
            raise ValueError("FedSA-LoRA reply carries lora_B, which stays on the node")
        full = dict(tensors)
        for module, f in current.factors.items():
            full[module + B_SUFFIX] = np.zeros_like(f.b)
        return state_from_dict(full, self.scaling(plan.rank))

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """A = sum_k p_k A_k, B = 0; the dense tensors by weighted FedAvg."""
        factors = average_a(updates, weights, current)
        return AdapterState(factors, average_dense(updates, weights), current.scaling)

    def extra_round_metrics(
        self,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
        result: AdapterState,
    ) -> dict[str, float]:
        """How far the nodes' A_k spread around the new A (``a-spread``)."""
        a_by_node = [{m: f.a for m, f in u.state.factors.items()} for u in updates]
        average = {m: f.a for m, f in result.factors.items()}
        return {A_SPREAD: a_spread(a_by_node, weights, average)}
