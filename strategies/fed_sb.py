"""Fed-SB: fixed A and B, only the r x r core R trained and averaged (exact, r^2 per module).

Singhal, Ponkshe, Vartak, Varshney, Vepakomma, "Fed-SB: A Silver Bullet for Extreme
Communication Efficiency and Performance in (Private) Federated LoRA Fine-Tuning"
(arXiv:2502.15436, 2025), built on LoRA-SB: Ponkshe, Singhal, Gorbunov, Tumanov, Horvath,
Vepakomma, "Initialization using Update Approximation is a Silver Bullet for Extremely
Efficient Low-Rank Fine-Tuning" (arXiv:2411.19557). Each adapted weight gets
dW = s B R A with A (r x d_in) and B (d_out x r) fixed and common to every client; only
R (r x r) is trained. So averaging R is exact,

    s B (sum_k p_k R_k) A = sum_k p_k s B R_k A,

and R is all that travels: r^2 numbers per module each way, whatever d_in and d_out.

How fedlora differs from the papers: LoRA-SB (and Fed-SB after it) takes A and B from
the truncated SVD of an approximation of the first full fine-tuning step (a gradient
accumulated over some training examples), with R initialised from its singular
values, so the first update already points where full fine-tuning would go; in Fed-SB
the server distributes these frozen A and B to the clients once. fedlora does not
compute that gradient (federatedly, it would cost a round of full d_out x d_in
gradients): A has orthonormal rows and B orthonormal columns, both drawn from the run's
``seed`` (:func:`fedlora.lora.plan.core_basis`, a seeded Gaussian orthonormalised by
QR) on the server and on every node, so they never travel, and R starts at zero (the
adapter starts as the identity, as peft's LoRA does). The bases keep the papers'
orthonormality (B^T B = I: R's gradient is the projection s B^T G A^T of the full
gradient G), but not their data-aware subspace, so expect a gap to the papers' accuracy
on tasks where that subspace matters; raise ``lora-alpha`` or the learning rate as for
FFA-LoRA (only r^2 parameters per module move).

The global adapter the server keeps is a standard LoRA adapter, a = A and b = B R (R
folded into B), so evaluation, export (``PeftModel.from_pretrained`` loads it),
checkpoints and the aggregation error work as for every strategy; R = B^T b recovers
the core. The node trains a peft model with a core (:mod:`fedlora.model.lora_core`):
the plan's ``train_core``. The head is averaged by FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlora.strategies.api import (
    A_SUFFIX,
    B_SUFFIX,
    CORE_SUFFIX,
    AdapterError,
    AdapterState,
    ClientPlan,
    ClientUpdate,
    LoraFactors,
    LoraStrategy,
    average_dense,
    core_basis,
    weighted_average,
)


def core_of(b: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """R = B^T b: the core of a folded factor b = B R (B with orthonormal columns)."""
    return (np.asarray(basis, np.float64).T @ np.asarray(b, np.float64)).astype(np.float32)


def fold(basis: np.ndarray, core: np.ndarray) -> np.ndarray:
    """The folded factor b = B R (a standard lora_B: b A = B R A)."""
    return (np.asarray(basis, np.float64) @ np.asarray(core, np.float64)).astype(np.float32)


def average_cores(cores: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """R = sum_k p_k R_k: exact, since s B R A is linear in R."""
    return weighted_average(cores, weights)


class FedSb(LoraStrategy):
    """Seeded orthonormal A and B fixed, the r x r core R trained and averaged (exact)."""

    name = "fed_sb"
    description = (
        "Fixed seeded orthonormal A and B, only the r x r core R trained and averaged "
        "(Fed-SB); exact, r^2 numbers per module each way"
    )
    exact = True
    heterogeneous_ranks = False  # R_k of different sizes live in different subspaces
    central_dp = frozenset({"client"})  # b = B mean(R_k), B orthonormal: ||B dR|| = ||dR||
    secure_sum = True  # the aggregate reads the replies only through the mean of R_k
    server_optimizer = False  # an adaptive step on b would leave the column space of B

    def basis(self, module: str, rank: int, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
        """The fixed (A, B) of ``module``, as every node rebuilds them (computed once).

        Kept read-only: a payload or a state that shares them cannot change them.
        """
        cache = self.__dict__.setdefault("_basis_cache", {})
        key = (module, rank, d_in, d_out)
        if key not in cache:
            pair = core_basis(module, rank, d_in, d_out, self.seed)
            for x in pair:
                x.setflags(write=False)
            cache[key] = pair
        return cache[key]

    def _bases(self, state: AdapterState) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {
            m: self.basis(m, f.rank, f.a.shape[1], f.b.shape[0]) for m, f in state.factors.items()
        }

    def initial_state(self, state: AdapterState) -> AdapterState:
        """The bases, with R = 0: a = A, b = B R = 0."""
        factors = {
            m: LoraFactors(a=a, b=np.zeros_like(basis))
            for m, (a, basis) in self._bases(state).items()
        }
        return AdapterState(factors, state.dense, state.scaling)

    def restore_fixed(self, state: AdapterState) -> AdapterState:
        """A from the seed; b projected onto the columns of B, b <- B B^T b.

        What the record held may have moved off that span (central DP's noise on b and a):
        the nodes receive only R = B^T b, so the global adapter is put back to B R.
        """
        factors = {
            m: LoraFactors(a=a, b=fold(basis, core_of(state.factors[m].b, basis)))
            for m, (a, basis) in self._bases(state).items()
        }
        return AdapterState(factors, state.dense, state.scaling)

    def client_plan(self, server_round: int, node_id: int, rank: int) -> ClientPlan:
        """Train the core only; A and B are the seeded bases, never sent either way."""
        return ClientPlan(
            rank=rank, init_seed=self.seed, train_core=True, send_a=False, send_b=False
        )

    def payload(
        self, server_round: int, node_id: int, plan: ClientPlan, current: AdapterState
    ) -> dict[str, np.ndarray]:
        """R = B^T b per module and the dense tensors; no A, no B."""
        if plan.rank != current.rank:
            raise AdapterError(f"Fed-SB trains at the global rank {current.rank}, not {plan.rank}")
        out = {
            m + CORE_SUFFIX: core_of(current.factors[m].b, basis)
            for m, (_, basis) in self._bases(current).items()
        }
        return out | dict(current.dense)

    def decode_update(
        self,
        server_round: int,
        plan: ClientPlan,
        tensors: Mapping[str, np.ndarray],
        current: AdapterState,
    ) -> AdapterState:
        """The node's adapter (A, B R_k) from its R_k; the dense tensors as sent."""
        if any(k.endswith((A_SUFFIX, B_SUFFIX)) for k in tensors):
            raise AdapterError("Fed-SB reply carries lora_A or lora_B, which never travel")
        factors = {}
        for m, (a, basis) in self._bases(current).items():
            core = tensors.get(m + CORE_SUFFIX)
            if core is None or np.shape(core) != (plan.rank, plan.rank):
                raise AdapterError(
                    f"Fed-SB reply lacks a {plan.rank} x {plan.rank} core for '{m}' "
                    f"(got {None if core is None else np.shape(core)})"
                )
            factors[m] = LoraFactors(a=a, b=fold(basis, core))
        dense = {
            k: np.asarray(v, np.float32) for k, v in tensors.items() if not k.endswith(CORE_SUFFIX)
        }
        return AdapterState(factors, dense, self.scaling(plan.rank))

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """R = sum p_k R_k per module (b = B R, a = A); dense tensors by FedAvg."""
        factors = {}
        for m, (a, basis) in self._bases(current).items():
            cores = [core_of(u.state.factors[m].b, basis) for u in updates]
            factors[m] = LoraFactors(a=a, b=fold(basis, average_cores(cores, weights)))
        return AdapterState(factors, average_dense(updates, weights), current.scaling)
