"""LoRA adapters as plain data: per-module (A, B) factors plus dense trainable tensors.

Keys are exactly peft's (``...query.lora_A.weight``, ``...classifier.weight``), so a
state saved by the model package loads with ``PeftModel.from_pretrained`` and nothing
else. Everything here is numpy float32: it is what crosses the wire (an ArrayRecord
cannot carry bfloat16) and what the strategies' pure math works on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
CORE_SUFFIX = ".lora_R.weight"
"""The r x r core R of dW = s B R A (LoRA-SB / Fed-SB, :mod:`fedlora.model.lora_core`).

Not a factor here: a flat state keeps it with the dense tensors; only a plan with
``train_core`` (:class:`fedlora.lora.plan.ClientPlan`) gives it its meaning."""
GRAD_SUFFIX = ".base_grad"
"""A module's mean loss gradient of its frozen base weight (d_out x d_in), the reply of a
``calibrate`` plan (Fed-SB's data-aware bases); a dense tensor here, like the core."""


class AdapterError(ValueError):
    """An adapter state is inconsistent (missing keys, wrong shapes, non-finite values)."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapted weight matrix: dW = s * b @ a with a: (r, d_in), b: (d_out, r)."""

    a: np.ndarray
    b: np.ndarray

    @property
    def rank(self) -> int:
        """The LoRA rank r."""
        return int(self.a.shape[0])


@dataclass(frozen=True)
class AdapterState:
    """A whole adapter: LoRA factors keyed by module path, dense tensors by peft key.

    ``scaling`` is the s of dW = s B A for every module (alpha / r, or alpha / sqrt(r)).
    """

    factors: Mapping[str, LoraFactors]
    dense: Mapping[str, np.ndarray] = field(default_factory=dict)
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        """The (common) rank of the factors; 0 for an adapter without LoRA modules."""
        ranks = {f.rank for f in self.factors.values()}
        if len(ranks) > 1:
            raise AdapterError(f"Adapter has mixed ranks {sorted(ranks)}")
        return ranks.pop() if ranks else 0

    def to_state_dict(self) -> dict[str, np.ndarray]:
        """Flat peft-keyed mapping (``module.lora_A.weight`` ...)."""
        out: dict[str, np.ndarray] = {}
        for module, f in self.factors.items():
            out[module + A_SUFFIX] = f.a
            out[module + B_SUFFIX] = f.b
        out.update(self.dense)
        return out

    def check_finite(self) -> None:
        """Raise naming the first tensor that holds NaN or Inf."""
        for key, value in self.to_state_dict().items():
            if not np.all(np.isfinite(value)):
                raise AdapterError(f"Tensor '{key}' contains NaN or Inf")


def state_from_dict(tensors: Mapping[str, np.ndarray], scaling: float) -> AdapterState:
    """Split a flat peft-keyed mapping into LoRA factors and dense tensors."""
    factors: dict[str, LoraFactors] = {}
    dense: dict[str, np.ndarray] = {}
    a_keys = {k[: -len(A_SUFFIX)] for k in tensors if k.endswith(A_SUFFIX)}
    b_keys = {k[: -len(B_SUFFIX)] for k in tensors if k.endswith(B_SUFFIX)}
    if a_keys != b_keys:
        odd = sorted(a_keys ^ b_keys)[0]
        raise AdapterError(f"Module '{odd}' has only one of lora_A / lora_B")
    for module in sorted(a_keys):
        a = np.asarray(tensors[module + A_SUFFIX], dtype=np.float32)
        b = np.asarray(tensors[module + B_SUFFIX], dtype=np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"Module '{module}': lora_A {a.shape} and lora_B {b.shape} do not form B @ A"
            )
        factors[module] = LoraFactors(a=a, b=b)
    for key, value in tensors.items():
        if not key.endswith((A_SUFFIX, B_SUFFIX)):
            dense[key] = np.asarray(value, dtype=np.float32)
    return AdapterState(factors=factors, dense=dense, scaling=float(scaling))


def resize_rank(factors: LoraFactors, rank: int) -> LoraFactors:
    """Zero-pad or truncate to ``rank`` (HetLoRA-style; padding is exact, truncation is not)."""
    r = factors.rank
    if rank == r:
        return factors
    if rank < r:
        return LoraFactors(a=factors.a[:rank].copy(), b=factors.b[:, :rank].copy())
    a = np.zeros((rank, factors.a.shape[1]), dtype=factors.a.dtype)
    b = np.zeros((factors.b.shape[0], rank), dtype=factors.b.dtype)
    a[:r] = factors.a
    b[:, :r] = factors.b
    return LoraFactors(a=a, b=b)
