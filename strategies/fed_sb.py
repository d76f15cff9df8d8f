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

``fed_sb_data`` (:class:`FedSbData`) is the papers' initialisation, federated: round 1
calibrates (each sampled node returns its mean loss gradient of every adapted base weight
over a few of its training examples), the server takes the truncated SVD of the first
AdamW step that gradient implies, -lr sign(G_bar) (G_bar the weighted mean), as fixed
bases and initial core (:func:`lora_sb_init`), and sends each node the bases once.

The global adapter the server keeps is a standard LoRA adapter, a = A and b = B R (R
folded into B), so evaluation, export (``PeftModel.from_pretrained`` loads it),
checkpoints and the aggregation error work as for every strategy; R = B^T b recovers
the core. The node trains a peft model with a core (:mod:`fedlora.model.lora_core`):
the plan's ``train_core``. The head is averaged by FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    fingerprint,
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


def lora_sb_init(
    grad: np.ndarray, rank: int, lr: float, scaling: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """LoRA-SB's initialisation from a mean gradient G (d_out x d_in): (A, B, R, energy).

    The first AdamW step of full fine-tuning is dW = -lr sign(G) (Adam's first update is
    the sign of the gradient). With its SVD U S V^T: B = U_r, A = V_r^T, R = S_r / s, so
    s B R A is the best rank-r approximation of dW (Eckart-Young), A has orthonormal rows
    and B orthonormal columns. ``energy``: the share of ||sign(G)||_F^2 the r components
    keep. The bases come from sign(G), so ``lr`` scales only R (0 starts R at zero).
    """
    step = -np.sign(np.asarray(grad, np.float64))
    if not 0 < rank <= min(step.shape):
        raise AdapterError(f"LoRA-SB rank {rank} must be in (0, {min(step.shape)}]")
    u, sv, vt = np.linalg.svd(step, full_matrices=False)
    total = float(np.sum(sv**2))
    energy = float(np.sum(sv[:rank] ** 2)) / total if total > 0 else 0.0
    core = np.diag(lr * sv[:rank] / scaling)
    return (
        np.ascontiguousarray(vt[:rank]).astype(np.float32),
        np.ascontiguousarray(u[:, :rank]).astype(np.float32),
        core.astype(np.float32),
        energy,
    )


def bases_id(bases: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """A summary of the fixed bases (seeded probes of each A and B): the id nodes store them by."""
    tensors = {m + A_SUFFIX: a for m, (a, _) in bases.items()}
    tensors |= {m + B_SUFFIX: b for m, (_, b) in bases.items()}
    return "sb:" + ",".join(f"{x:.8e}" for x in fingerprint(tensors, probes=2))


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


class FedSbData(FedSb):
    """Fed-SB with LoRA-SB's data-aware bases: round 1 calibrates, then only R travels up.

    Round 1's nodes return their mean loss gradients of the adapted base weights; the
    server sets A, B and the first R from them (:func:`lora_sb_init`). From round 2 each
    node trains R between those bases. A node receives the bases (lora_A, lora_B) in the
    first payload after it was last seen without them and stores them; later payloads
    carry only R and the head. The uplink is r^2 per module from round 2; round 1's is
    the full d_out x d_in gradient per module.

    The calibration gradients are the nodes' unclipped, unnoised data: client DP-SGD would
    not cover them (``calibrates``: dp=true is refused), and neither central DP nor SecAgg+
    is offered. Use ``fed_sb`` (seeded bases) with any of those. A quantised base
    calibrates: the nodes take dy^T x at each adapted layer, not a weight's gradient.
    """

    name = "fed_sb_data"
    description = (
        "Fed-SB with LoRA-SB's data-aware bases: round 1 collects mean gradients, the server "
        "fixes A, B and R_0 from their SVD; then only the r x r core R travels up"
    )
    central_dp: frozenset[str] = frozenset()
    secure_sum = False
    calibrates = True

    @dataclass(frozen=True)
    class Settings:
        """``calibration-examples``: training examples per node in round 1 (default 64).

        ``init-lr``: the learning rate of the full fine-tuning step the initial R
        approximates (default 2e-5, a common full fine-tuning rate; 0 starts R at zero).
        """

        calibration_examples: int = 64
        init_lr: float = 2e-5

        def __post_init__(self) -> None:
            if self.calibration_examples <= 0:
                raise ValueError(
                    f"Invalid value for 'calibration-examples': {self.calibration_examples} "
                    "must be > 0"
                )
            if self.init_lr < 0:
                raise ValueError(f"Invalid value for 'init-lr': {self.init_lr} must be >= 0")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fixed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.fixed_id = ""
        self.energy = float("nan")
        self.has_bases: set[int] = set()  # nodes that replied since they were sent the bases
        self.asked: dict[int, set[int]] = {}  # round -> nodes given a plan

    @property
    def calibrated(self) -> bool:
        """Whether round 1's gradients have fixed the bases."""
        return bool(self.fixed)

    def basis(self, module: str, rank: int, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
        """The calibrated (A, B) of ``module``; the seeded ones until calibration."""
        if not self.calibrated:
            return super().basis(module, rank, d_in, d_out)
        a, b = self.fixed[module]
        if a.shape != (rank, d_in) or b.shape != (d_out, rank):
            raise AdapterError(
                f"Fed-SB bases of '{module}' are {a.shape} / {b.shape}, not rank {rank}"
            )
        return a, b

    def client_plan(self, server_round: int, node_id: int, rank: int) -> ClientPlan:
        """Calibrate until the bases are fixed; then train R between the sent bases."""
        self.asked.setdefault(server_round, set()).add(node_id)
        if not self.calibrated:
            return ClientPlan(
                rank=rank,
                init_seed=self.seed,
                send_a=False,
                send_b=False,
                calibrate=self.settings.calibration_examples,
            )
        return ClientPlan(
            rank=rank,
            init_seed=self.seed,
            train_core=True,
            send_a=False,
            send_b=False,
            core_bases=self.fixed_id,
        )

    def payload(
        self, server_round: int, node_id: int, plan: ClientPlan, current: AdapterState
    ) -> dict[str, np.ndarray]:
        """Calibration: the head. Then R and the head, and the bases if the node lacks them."""
        if plan.calibrate:
            return dict(current.dense)
        out = super().payload(server_round, node_id, plan, current)
        # a node of an earlier round not yet settled (skipped, so aggregate never ran) may
        # have failed for want of the bases: send them again, which costs only bytes
        unsettled = any(node_id in nodes for r, nodes in self.asked.items() if r < server_round)
        if node_id not in self.has_bases or unsettled:
            for m, (a, b) in self.fixed.items():
                out[m + A_SUFFIX], out[m + B_SUFFIX] = a, b
        return out

    def decode_update(
        self,
        server_round: int,
        plan: ClientPlan,
        tensors: Mapping[str, np.ndarray],
        current: AdapterState,
    ) -> AdapterState:
        """A calibration reply's gradients, as dense tensors keyed by module; else as Fed-SB."""
        if not plan.calibrate:
            return super().decode_update(server_round, plan, tensors, current)
        # the plan names the reply's keys, one per module, in the order of current.factors
        keys = dict(zip(current.factors, plan.reply_shapes(current).items(), strict=True))
        grads = {}
        for module, (key, shape) in keys.items():
            grad = tensors.get(key)
            if grad is None or np.shape(grad) != shape:
                raise AdapterError(
                    f"Fed-SB calibration reply needs a {shape} gradient '{key}' "
                    f"(got {None if grad is None else np.shape(grad)})"
                )
            if not np.isfinite(grad).all():
                raise AdapterError(f"Fed-SB calibration gradient '{key}' has non-finite values")
            grads[module] = np.asarray(grad, np.float32)
        if len(tensors) != len(grads):
            extra = sorted(set(tensors) - {k for k, _ in keys.values()})
            raise AdapterError(f"Fed-SB calibration reply carries other tensors {extra[:2]}")
        return AdapterState(dict(current.factors), grads, self.scaling(plan.rank))

    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """Round 1: fix the bases and R_0 from the mean gradient. Later rounds: as Fed-SB."""
        self._settle(server_round, updates)
        if not (updates and all(u.plan.calibrate for u in updates)):
            return super().aggregate(server_round, updates, weights, current)
        s, lr = current.scaling, self.settings.init_lr
        factors, fixed, energies = {}, {}, []
        for m, f in current.factors.items():
            grad = weighted_average([u.state.dense[m] for u in updates], weights)
            a, b, core, energy = lora_sb_init(grad, f.rank, lr, s)
            a.setflags(write=False)
            b.setflags(write=False)
            fixed[m] = (a, b)
            energies.append(energy)
            factors[m] = LoraFactors(a=a, b=fold(b, core))
        self.fixed, self.fixed_id = fixed, bases_id(fixed)
        self.energy = float(np.mean(energies))
        self.has_bases = set()  # nobody holds these bases yet
        return AdapterState(factors, dict(current.dense), s)

    def _settle(self, server_round: int, updates: Sequence[ClientUpdate]) -> None:
        """Nodes that replied hold the bases; those asked that did not may have lost them."""
        replied = {u.node_id for u in updates}
        asked = self.asked.pop(server_round, set())
        for old in [r for r in self.asked if r < server_round]:
            asked |= self.asked.pop(old)
        self.has_bases = (self.has_bases - asked) | replied

    def extra_round_metrics(
        self,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
        result: AdapterState,
    ) -> dict[str, float]:
        """In the calibration round: the share of sign(G_bar)'s energy the bases keep.

        ``sb-init-energy`` is the mean of that share over the modules.
        """
        if updates and all(u.plan.calibrate for u in updates):
            return {"sb-init-energy": self.energy}
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The bases (when fixed) and their id."""
        return {
            "fixed_id": self.fixed_id,
            "energy": self.energy,
            "bases": {m + A_SUFFIX: a for m, (a, _) in self.fixed.items()}
            | {m + B_SUFFIX: b for m, (_, b) in self.fixed.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a resumed run keeps its bases.

        Every node is sent them again: a resumed run's nodes may have restarted.
        """
        bases = state.get("bases", {})
        fixed = {}
        for key, a in bases.items():
            if key.endswith(A_SUFFIX):
                module = key[: -len(A_SUFFIX)]
                pair = (np.asarray(a, np.float32), np.asarray(bases[module + B_SUFFIX], np.float32))
                for x in pair:
                    x.setflags(write=False)
                fixed[module] = pair
        self.fixed = fixed
        self.fixed_id = str(state.get("fixed_id", bases_id(fixed) if fixed else ""))
        self.energy = float(state.get("energy", float("nan")))
        self.has_bases = set()
