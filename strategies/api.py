"""The public strategy API: everything a strategy plugin needs, and nothing from Flower.

A strategy subclasses :class:`LoraStrategy` and implements :meth:`~LoraStrategy.aggregate`,
a pure function of the decoded client updates. Optional hooks say what each node is sent
and asked to do. The server (``fedlora.server``) owns the Flower round around it: node
sampling, links and the message-size limit, reply validation, the weights p_k, central
DP, reports. So a strategy can be used and tested with plain numpy arrays, as the
conformance kit (:mod:`fedlora.strategies.conformance`) does.

Every round the server measures the relative aggregation error

    e = ||sum_k p_k s_k B_k A_k - s B A||_F / ||sum_k p_k s_k B_k A_k||_F

of what :meth:`~LoraStrategy.aggregate` returns (:func:`aggregation_error`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedlora.lora.base_merge import (
    LAST_MERGED,
    MergeLedger,
    base_disagreement,
    fingerprint_distance,
    merge_into_base,
    stack_payload,
)
from fedlora.lora.lowrank import (
    LowRankTerm,
    ProductSum,
    fingerprint,
    lowrank_svd,
    procrustes_rotation,
    relative_error,
    sum_sq_norm,
    truncated_svd,
)
from fedlora.lora.plan import ClientPlan, core_basis
from fedlora.lora.seeded import seeded_a
from fedlora.lora.spec import LoraSpec
from fedlora.lora.state import (
    A_SUFFIX,
    B_SUFFIX,
    CORE_SUFFIX,
    AdapterError,
    AdapterState,
    LoraFactors,
    resize_rank,
    state_from_dict,
)

__all__ = [
    "A_SUFFIX",
    "B_SUFFIX",
    "CORE_SUFFIX",
    "LAST_MERGED",
    "AdapterError",
    "AdapterState",
    "ClientPlan",
    "ClientUpdate",
    "LoraFactors",
    "LoraSpec",
    "LoraStrategy",
    "LowRankTerm",
    "MergeLedger",
    "NoSettings",
    "ProductSum",
    "aggregation_error",
    "average_dense",
    "base_disagreement",
    "complete_reply",
    "core_basis",
    "fingerprint",
    "fingerprint_distance",
    "logger",
    "lowrank_svd",
    "merge_into_base",
    "node_view",
    "procrustes_rotation",
    "relative_error",
    "resize_rank",
    "seeded_a",
    "stack_payload",
    "state_from_dict",
    "sum_sq_norm",
    "truncated_svd",
    "weighted_average",
]

logger = logging.getLogger("flwr.fedlora")
"""A strategy's logger: a child of Flower's, so its records print once, in Flower's format."""


@dataclass(frozen=True)
class NoSettings:
    """The settings of a strategy that has none."""


@dataclass(frozen=True)
class ClientUpdate:
    """One node's decoded, validated reply: its trained adapter at its own rank.

    ``state.scaling`` is the node's s_k (alpha / r_k), set by the server from the rank,
    never trusted from the reply. ``num_examples`` is the node's claim (the server bounds
    what it buys in the weights it passes to :meth:`LoraStrategy.aggregate`).
    """

    node_id: int
    num_examples: int
    state: AdapterState
    metrics: Mapping[str, float]
    plan: ClientPlan


class LoraStrategy(ABC):
    """Base class of every fedlora strategy (built-in or plugin).

    Subclasses set ``name`` and ``description`` and implement :meth:`aggregate`. Class
    attributes declare what the conformance kit checks and the docs may claim: ``exact`` (the
    aggregation error is zero up to float error), ``heterogeneous_ranks`` (clients may train at
    different ranks) and ``central_dp``, the modes of Flower's central-DP wrappers it composes
    with: ``"client"`` holds when :meth:`aggregate` is the plain mean of what the nodes sent,
    ``"server"`` also needs every reply to carry every tensor of the global adapter.
    ``merges_into_base`` says that plans merge stacks into the nodes' base weights (FLoRA): such
    a strategy is refused with a quantised base, whose packed weights cannot take W0 + delta.
    ``server_optimizer`` says that the aggregate is a point in the global adapter's own
    coordinates, so that ``server-optimizer`` (FedAvgM, FedAdam, FedYogi) may step along
    aggregate - current; the kit checks that nodes which send the global adapter back unchanged
    get it back. ``secure_sum``: aggregate reads the replies only via their weighted mean
    (SecAgg+ passes just that). ``personal_factors``: nodes keep a factor the server never sees
    (FedSA-LoRA's B), so the server neither evaluates the global adapter nor records an
    aggregation error. ``calibrates``: a plan asks for base-weight gradients: ``dp`` and a
    quantised base are refused. ``Settings`` is a frozen dataclass of the strategy's own
    options: the server fills it from ``strategy-options`` (kebab-case keys; unknown keys are
    refused), and the strategy reads ``self.settings``.

    Parameters
    ----------
    lora : LoraSpec
        Rank, alpha, targets and scaling rule of the global adapter.
    seed : int (default: 0)
        Seeds anything random the strategy does (seeded factors, per-round draws).
    settings : Settings, optional
        The strategy's own settings (default: ``Settings()``).

    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    heterogeneous_ranks: ClassVar[bool] = False
    central_dp: ClassVar[frozenset[str]] = frozenset()
    merges_into_base: ClassVar[bool] = False
    server_optimizer: ClassVar[bool] = False
    secure_sum: ClassVar[bool] = False
    personal_factors: ClassVar[bool] = False
    calibrates: ClassVar[bool] = False
    Settings: ClassVar[type] = NoSettings

    def __init__(self, lora: LoraSpec, *, seed: int = 0, settings: Any = None) -> None:
        self.lora = lora
        self.seed = seed
        self.settings = type(self).Settings() if settings is None else settings

    # -- the one required method ---------------------------------------------------
    @abstractmethod
    def aggregate(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
    ) -> AdapterState:
        """Combine the clients' adapters into the next global adapter.

        ``weights`` are the p_k (non-negative, summing to 1). ``current`` is the global
        adapter the clients started from. Must not modify its inputs; the result adapts
        the same modules and has the same dense tensors as ``current``.
        """

    # -- optional hooks ------------------------------------------------------------
    def initial_state(self, state: AdapterState) -> AdapterState:
        """Adjust the freshly initialised global adapter before round 1 (default: as is)."""
        return state

    def client_plan(self, server_round: int, node_id: int, rank: int) -> ClientPlan:
        """What ``node_id``, which trains at ``rank``, does this round (default: train A and B)."""
        return ClientPlan(rank=rank, init_seed=self.seed)

    def evaluation_plan(self, server_round: int, node_id: int, rank: int) -> ClientPlan:
        """How ``node_id`` evaluates the global adapter (default: as received)."""
        return ClientPlan(rank=rank)

    def payload(
        self, server_round: int, node_id: int, plan: ClientPlan, current: AdapterState
    ) -> dict[str, np.ndarray]:
        """Tensors sent to ``node_id`` (default: the global adapter at the node's rank)."""
        return node_view(current, plan.rank, self.scaling(plan.rank)).to_state_dict()

    def decode_update(
        self,
        server_round: int,
        plan: ClientPlan,
        tensors: Mapping[str, np.ndarray],
        current: AdapterState,
    ) -> AdapterState:
        """A reply's tensors as the node's full adapter, at scaling s_k (default: as sent).

        A strategy whose replies omit some tensors (FFA-LoRA's frozen A) rebuilds them.
        """
        return state_from_dict(tensors, self.scaling(plan.rank))

    def accept_update(self, server_round: int, update: ClientUpdate) -> str | None:
        """Veto a decoded, well-formed update: return the reason to drop it (default: none)."""
        return None

    def restore_fixed(self, state: AdapterState) -> AdapterState:
        """The decoded global adapter with what the strategy holds fixed put back.

        Flower's central-DP noise perturbs every tensor it is given; a strategy whose nodes
        rebuild a tensor themselves (FFA-LoRA's seeded A) restores it here.
        """
        return state

    def base_delta(self) -> Mapping[str, np.ndarray] | None:
        """Per-module deltas merged into the base weights under the global adapter.

        ``None`` (default): the global adapter sits on the original base. FLoRA returns
        the sum of the stacks merged so far; evaluation and export apply it.
        """
        return None

    def extra_round_metrics(
        self,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
        result: AdapterState,
    ) -> dict[str, float]:
        """Further per-round numbers for the round's record (default: none)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The strategy's own state for a checkpoint (JSON values or numpy arrays)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`state_dict` returned (default: nothing to restore)."""

    # -- helpers -------------------------------------------------------------------
    def scaling(self, rank: int) -> float:
        """The LoRA scaling s at ``rank`` (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
        return self.lora.with_rank(rank).scaling


# --------------------------------------------------------------------------- #
# The math every strategy shares (pure functions on numpy arrays)              #
# --------------------------------------------------------------------------- #
def weighted_average(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_k w_k x_k, summed in float64, returned as float32.

    Each product w_k x_k is formed in float32 (within one float32 ulp of exact) and added
    to a float64 accumulator, so no float64 copy of a client's tensor is made: about 1.5x
    a plain float32 weighted sum (simulations/bench_aggregation.py). The error is at most
    one float32 rounding of each product, 2^-24 sum_k |w_k x_k|, plus the final rounding.
    """
    out = np.zeros(np.shape(arrays[0]), dtype=np.float64)
    for x, w in zip(arrays, weights, strict=True):
        out += np.asarray(x, dtype=np.float32) * np.float32(w)
    return out.astype(np.float32)


def average_dense(
    updates: Sequence[ClientUpdate], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Weighted FedAvg of the dense trainable tensors (the head), as every strategy does."""
    keys = sorted(updates[0].state.dense) if updates else []
    return {k: weighted_average([u.state.dense[k] for u in updates], weights) for k in keys}


def complete_reply(
    tensors: Mapping[str, np.ndarray], current: AdapterState
) -> dict[str, np.ndarray]:
    """A reply's tensors plus the factors its plan kept frozen and did not send.

    A node that trained B only (or A only) at the global rank started that factor from
    the global adapter and left it there, so the server takes it from ``current``.
    """
    full = dict(tensors)
    for key, value in current.to_state_dict().items():
        if key.endswith((A_SUFFIX, B_SUFFIX)):
            full.setdefault(key, value)
    return full


def node_view(state: AdapterState, rank: int, scaling: float) -> AdapterState:
    """``state`` as seen by a node of ``rank`` and ``scaling`` (HetLoRA-style).

    B is rescaled by s / s_k so that s_k B_k A_k matches s B A on the kept components,
    then both factors are zero-padded or truncated to ``rank``.
    """
    factor = state.scaling / scaling
    factors = {
        m: resize_rank(LoraFactors(f.a, (f.b * factor).astype(np.float32)), rank)
        for m, f in state.factors.items()
    }
    return AdapterState(factors, state.dense, scaling)


def aggregation_error(
    updates: Sequence[ClientUpdate], weights: Sequence[float], state: AdapterState
) -> float:
    """Relative error of ``state`` against the exact average of the clients' products."""
    target: list[list[LowRankTerm]] = []
    approx: list[list[LowRankTerm]] = []
    for m in sorted(state.factors):
        target.append(
            [
                (float(w) * u.state.scaling, u.state.factors[m].b, u.state.factors[m].a)
                for u, w in zip(updates, weights, strict=True)
            ]
        )
        approx.append([(state.scaling, state.factors[m].b, state.factors[m].a)])
    return relative_error(target, approx)
