"""In-memory clients that follow a strategy's plan, for tests and the conformance kit.

A :class:`SimulatedClient` does what a real fedlora client does with a ClientPlan
(receive the payload, start from it as the plan says, train what is trainable, reply
with what the plan says to send) but "training" is a seeded random perturbation. It
lets a strategy be exercised end to end on its public hooks, without Flower or torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedlora.adapters import A_SUFFIX, B_SUFFIX, start_tensors
from strategies.base import AdapterState, ClientPlan, ClientUpdate, LoraStrategy


@dataclass
class SimulatedClient:
    """One fake node: an id, a number of examples and a step size for its fake training."""

    node_id: int
    num_examples: int
    step: float = 0.1

    def fresh(self, current: AdapterState, rank: int, rng: np.random.Generator) -> dict:
        """A fresh peft-like initialisation at ``rank``: random A, zero B, the current dense."""
        out: dict[str, np.ndarray] = {}
        for module, f in current.factors.items():
            bound = 1.0 / np.sqrt(f.a.shape[1])
            out[module + A_SUFFIX] = rng.uniform(-bound, bound, (rank, f.a.shape[1])).astype(
                np.float32
            )
            out[module + B_SUFFIX] = np.zeros((f.b.shape[0], rank), np.float32)
        out.update({k: v.copy() for k, v in current.dense.items()})
        return out

    def train(
        self,
        plan: ClientPlan,
        payload: Mapping[str, np.ndarray],
        current: AdapterState,
        rng: np.random.Generator,
    ) -> dict[str, np.ndarray]:
        """Start as the plan says, perturb the trainable tensors, return the reply tensors."""
        start = start_tensors(
            self.fresh(current, plan.rank, rng),
            {k: v for k, v in payload.items() if not k.startswith("merge/")},
            rank=plan.rank,
            reinit=plan.reinit,
            a_from_seed=plan.a_from_seed,
            init_seed=plan.init_seed,
        )
        out = {}
        for key, value in start.items():
            frozen = plan.freeze_a and key.endswith(A_SUFFIX)
            noise = 0.0 if frozen else self.step * rng.standard_normal(value.shape)
            out[key] = (value + noise).astype(np.float32)
        if not plan.send_a:
            out = {k: v for k, v in out.items() if not k.endswith(A_SUFFIX)}
        return out


def simulate_round(
    strategy: LoraStrategy,
    server_round: int,
    current: AdapterState,
    clients: Sequence[SimulatedClient],
    rng: np.random.Generator,
) -> list[ClientUpdate]:
    """Plan, send, fake-train and decode one round for ``clients`` (no aggregation)."""
    updates = []
    for client in clients:
        plan = strategy.client_plan(server_round, client.node_id)
        payload = strategy.payload(server_round, client.node_id, plan, current)
        reply = client.train(plan, payload, current, rng)
        state = strategy.decode_update(server_round, plan, reply, current)
        updates.append(ClientUpdate(client.node_id, client.num_examples, state, {}, plan))
    return updates
