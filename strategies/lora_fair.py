"""LoRA-FAIR: FedAvg of the factors, then a server-side residual correction of B.

Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement" (2024/2025). After A_bar = sum p_k A_k and
B_bar = sum p_k B_k the server looks for a small dB such that s (B_bar + dB) A_bar is
close to the ideal dW* = sum p_k s_k B_k A_k. The default is the ridge least-squares
form with a closed solution (an r x r solve):

    dB = (dW*/s - B_bar A_bar) A_bar^T (A_bar A_bar^T + lambda I)^-1

computed without forming dW* (dW* A_bar^T = sum p_k s_k B_k (A_k A_bar^T)). Because the
penalty is on dB, the corrected error never exceeds FedAvg's, for any lambda >= 0.
The paper's own form (1 - cosine similarity + lambda ||dB||, a few gradient steps) is
offered as ``fair-method = "cosine"``. Clients continue from the corrected factors.
Each round also records e(FedAvg) and the floor: the part of dW* outside the row space
of A_bar, which no choice of dB can remove.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.strategies.api import (
    AdapterState,
    ClientUpdate,
    LoraFactors,
    LoraStrategy,
    LowRankTerm,
    ProductSum,
)
from fedlora.strategies.fedavg import fedavg_states


def _target_terms(
    updates: Sequence[ClientUpdate], weights: Sequence[float], module: str
) -> list[LowRankTerm]:
    return [
        (float(w) * u.state.scaling, u.state.factors[module].b, u.state.factors[module].a)
        for u, w in zip(updates, weights, strict=True)
    ]


def ridge_correction(
    target: Sequence[LowRankTerm], a_bar: np.ndarray, b_bar: np.ndarray, scaling: float, lam: float
) -> np.ndarray:
    """Return dB minimising ||T/s - (B_bar + dB) A_bar||^2 + lam_abs ||dB||^2 (closed form).

    ``lam`` is relative: lam_abs = lam * trace(A_bar A_bar^T) / r, so the same value
    works whatever the scale of A. lam = 0 gives the least-squares projection.
    """
    a = a_bar.astype(np.float64)
    gram = a @ a.T
    r = gram.shape[0]
    lam_abs = lam * float(np.trace(gram)) / max(r, 1)
    t_at = sum(
        c * np.asarray(b, np.float64) @ (np.asarray(ak, np.float64) @ a.T) for c, b, ak in target
    )
    rhs = t_at / scaling - b_bar.astype(np.float64) @ gram
    system = gram + lam_abs * np.eye(r)
    # Solve dB @ system = rhs; lstsq copes with a rank-deficient A_bar when lam = 0.
    db = np.linalg.lstsq(system.T, rhs.T, rcond=None)[0].T
    return db.astype(np.float32)


def cosine_correction(
    target: Sequence[LowRankTerm],
    a_bar: np.ndarray,
    b_bar: np.ndarray,
    scaling: float,
    lam: float,
    steps: int,
    lr: float,
) -> np.ndarray:
    """The paper's form: minimise 1 - cos(dW*, s (B_bar + dB) A_bar) + lam ||dB|| by Adam."""
    import torch

    t = torch.from_numpy(
        sum(c * np.asarray(b, np.float64) @ np.asarray(a, np.float64) for c, b, a in target)
    )
    a = torch.from_numpy(a_bar.astype(np.float64))
    b = torch.from_numpy(b_bar.astype(np.float64))
    db = torch.zeros_like(b, requires_grad=True)
    opt = torch.optim.Adam([db], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        approx = scaling * (b + db) @ a
        cos = torch.nn.functional.cosine_similarity(approx.flatten(), t.flatten(), dim=0)
        loss = 1.0 - cos + lam * db.norm()
        loss.backward()
        opt.step()
    return db.detach().numpy().astype(np.float32)


class LoraFair(LoraStrategy):
    """FedAvg of A and B plus the server-side residual correction of B."""

    name = "lora_fair"
    description = "FedAvg + server-side residual correction of B (LoRA-FAIR); e <= e(FedAvg)"
    exact = False
    heterogeneous_ranks = False
    server_optimizer = True  # its aggregate is a point in the global adapter's coordinates

    @dataclass(frozen=True)
    class Settings:
        """``fair-method``: "ridge" (closed form, default) or "cosine" (the paper's loss).

        ``fair-lambda``: the penalty on dB; default 1e-4 for ridge (relative to the mean
        eigenvalue of A_bar A_bar^T), the paper's 0.01 for cosine. ``fair-steps`` and
        ``fair-lr``: the cosine form's Adam steps (50) and step size (0.01).
        """

        fair_method: str = "ridge"
        fair_lambda: float | None = None
        fair_steps: int = 50
        fair_lr: float = 0.01

        def __post_init__(self) -> None:
            if self.fair_method not in ("ridge", "cosine"):
                raise ValueError(
                    f"Invalid value for 'fair-method': {self.fair_method!r} (ridge or cosine)"
                )
            if self.fair_lambda is not None and self.fair_lambda < 0:
                raise ValueError(
                    f"Invalid value for 'fair-lambda': {self.fair_lambda} must be >= 0"
                )
            if self.fair_steps <= 0 or self.fair_lr <= 0:
                raise ValueError("Invalid value for 'fair-steps' / 'fair-lr': must be > 0")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        self.method = s.fair_method
        default_lam = 1e-4 if self.method == "ridge" else 0.01
        self.lam = default_lam if s.fair_lambda is None else s.fair_lambda
        self.steps, self.lr = s.fair_steps, s.fair_lr
        self._last: dict[str, float] = {}

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """FedAvg, then B <- B_bar + dB per module (kept only if it lowers the error)."""
        avg = fedavg_states([u.state for u in updates], weights, current.rank, current.scaling)
        factors: dict[str, LoraFactors] = {}
        target_sq = before_sq = after_sq = floor_sq = 0.0
        for module, f in sorted(avg.factors.items()):
            terms = _target_terms(updates, weights, module)
            target = ProductSum(terms)  # the one R x R Gram of this module, dropped after it
            if self.method == "ridge":
                db = ridge_correction(terms, f.a, f.b, avg.scaling, self.lam)
            else:
                db = cosine_correction(terms, f.a, f.b, avg.scaling, self.lam, self.steps, self.lr)
            corrected = LoraFactors(a=f.a, b=(f.b + db).astype(np.float32))
            before = target.distance_sq([(avg.scaling, f.b, f.a)])
            after = target.distance_sq([(avg.scaling, corrected.b, corrected.a)])
            factors[module] = corrected if after <= before else f
            target_sq += target.sq_norm
            before_sq += before
            after_sq += min(before, after)
            floor_sq += target.outside_rows_sq(f.a)
        result = AdapterState(factors=factors, dense=avg.dense, scaling=avg.scaling)

        def rel(value: float) -> float:
            return float(np.sqrt(value / target_sq)) if target_sq > 0 else 0.0

        self._last = {
            "fedavg-error": rel(before_sq),
            "fair-error": rel(after_sq),  # the base class measures it again, independently
            "fair-floor": rel(floor_sq),
        }
        return result

    def extra_round_metrics(
        self,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
        result: AdapterState,
    ) -> dict[str, float]:
        """e(FedAvg) and the row-space floor next to e(FAIR)."""
        return dict(self._last)
