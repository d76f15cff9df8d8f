"""Server-side optimisers on the aggregate: FedAvgM, FedAdam and FedYogi.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization" (ICLR 2021), Algorithm 2; FedAvgM: Hsu, Qi, Brown, "Measuring the Effects
of Non-Identical Data Distribution for Federated Visual Classification" (2019).

The strategy's aggregate x̄ of round t and the global adapter x it started from give the
pseudo-gradient Δ = x̄ - x (per tensor: each lora_A, lora_B and dense tensor). Then

    FedAvgM:  v = β v + Δ;                              x <- x + η v
    FedAdam:  m = β1 m + (1 - β1) Δ;  u = β2 u + (1 - β2) Δ²;            x <- x + η m / (√u + τ)
    FedYogi:  m = β1 m + (1 - β1) Δ;  u = u - (1 - β2) Δ² sign(u - Δ²);  x <- x + η m / (√u + τ)

with m and v starting at 0 and u at τ² (the paper's v_{-1} >= τ², no bias correction).
FedAvgM with η = 1 and β = 0 is the strategy's own aggregate.

This is sound only for a strategy whose aggregate is a point in the same coordinates as
the global adapter it started from (FedAvg, FFA-LoRA, LoRA-FAIR): a strategy declares it
with ``LoraStrategy.server_optimizer``, and the conformance kit checks the claim (clients
that send back the global adapter unchanged must get it back, so that Δ = 0 means "no
change"). FLoRA re-initialises the adapter every round and FlexLoRA re-factorises it by
SVD, so their factors of two rounds are not comparable and Δ means nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.lora.state import AdapterState, state_from_dict

SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi")
DEFAULT_SERVER_LR = {"fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}
"""η when ``server-lr`` is 0: FedAvgM's neutral step; Reddi et al.'s adaptive optimisers
take η about 10^-2 (their grid: 10^-3 to 10^0.5)."""


@dataclass(frozen=True)
class ServerOptimizerSpec:
    """Which optimiser, and its hyper-parameters (validated by the run configuration)."""

    kind: str = "none"
    lr: float = 0.0  # 0: DEFAULT_SERVER_LR[kind]
    momentum: float = 0.9  # FedAvgM's β
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    @property
    def step_size(self) -> float:
        """η: the given learning rate, or the optimiser's default."""
        return self.lr if self.lr > 0 else DEFAULT_SERVER_LR.get(self.kind, 1.0)


def fedavgm_step(
    x: np.ndarray, delta: np.ndarray, v: np.ndarray, lr: float, momentum: float
) -> tuple[np.ndarray, np.ndarray]:
    """One FedAvgM step: the new x and momentum buffer v (float64 arithmetic)."""
    v = momentum * v + delta
    return x + lr * v, v


def adaptive_step(
    x: np.ndarray,
    delta: np.ndarray,
    m: np.ndarray,
    u: np.ndarray,
    spec: ServerOptimizerSpec,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One FedAdam or FedYogi step: the new x, first moment m and second moment u."""
    m = spec.beta1 * m + (1.0 - spec.beta1) * delta
    sq = delta * delta
    if spec.kind == "fedadam":
        u = spec.beta2 * u + (1.0 - spec.beta2) * sq
    else:  # fedyogi
        u = u - (1.0 - spec.beta2) * sq * np.sign(u - sq)
    return x + spec.step_size * m / (np.sqrt(u) + spec.tau), m, u


def step_norm(before: AdapterState, after: AdapterState) -> float:
    """||after - before|| over every tensor of the adapter (Frobenius, float64)."""
    x, y = before.to_state_dict(), after.to_state_dict()
    return float(np.sqrt(sum(np.sum((np.float64(y[k]) - np.float64(x[k])) ** 2) for k in y)))


class ServerOptimizer:
    """The optimiser's state (per tensor key) across rounds, and its step on an adapter."""

    def __init__(self, spec: ServerOptimizerSpec) -> None:
        if spec.kind not in SERVER_OPTIMIZERS[1:]:
            raise ValueError(f"unknown server optimiser {spec.kind!r}")
        self.spec = spec
        self.moments: dict[str, dict[str, np.ndarray]] = {}

    def step(self, current: AdapterState, aggregate: AdapterState) -> AdapterState:
        """The next global adapter: ``current`` moved along Δ = ``aggregate`` - ``current``."""
        before, after = current.to_state_dict(), aggregate.to_state_dict()
        out: dict[str, np.ndarray] = {}
        for key, x_new in after.items():
            x = np.asarray(before[key], dtype=np.float64)
            delta = np.asarray(x_new, dtype=np.float64) - x
            state = self.moments.get(key)
            if state is None or state["m"].shape != x.shape:
                state = {"m": np.zeros_like(x), "u": np.full_like(x, self.spec.tau**2)}
            if self.spec.kind == "fedavgm":
                x, state["m"] = fedavgm_step(x, delta, state["m"], self.spec.step_size,
                                             self.spec.momentum)  # fmt: skip
            else:
                x, state["m"], state["u"] = adaptive_step(
                    x, delta, state["m"], state["u"], self.spec
                )
            self.moments[key] = state
            out[key] = x.astype(np.float32)
        return state_from_dict(out, aggregate.scaling)

    def state_dict(self) -> dict[str, Any]:
        """The moments, as numpy arrays keyed ``<m|u>/<tensor key>`` (for a checkpoint)."""
        return {
            f"{name}/{key}": value for key, s in self.moments.items() for name, value in s.items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.moments = {}
        for flat, value in state.items():
            name, key = flat.split("/", 1)
            self.moments.setdefault(key, {})[name] = np.asarray(value, dtype=np.float64)
