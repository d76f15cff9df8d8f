"""The public strategy API: :class:`LoraStrategy` and the data it works on.

A strategy plugin subclasses :class:`LoraStrategy` and implements one method,
:meth:`LoraStrategy.aggregate`, a pure function of the decoded client updates. The
Flower hooks (``configure_train``, ``aggregate_train``, ...) are written once here:
they sample nodes with a seeded generator, build one message per node, decode and
validate every reply (a bad reply is dropped with a logged reason and the round goes
on with the rest), call ``aggregate``, check its output, and measure the relative
aggregation error

    e = ||sum_k p_k s_k B_k A_k - s B A||_F / ||sum_k p_k s_k B_k A_k||_F

every round (ALGORITHMS.md). Optional hooks let a strategy send per-node payloads and
instructions, tell clients to freeze or re-initialise factors, and checkpoint state.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedlora.lora.base_merge import merge_into_base
from fedlora.lora.lowrank import (
    LowRankTerm,
    ProductSum,
    fingerprint,
    relative_error,
    sum_sq_norm,
    truncated_svd,
)
from fedlora.lora.seeded import seeded_a
from fedlora.lora.spec import LoraSpec
from fedlora.lora.state import (
    A_SUFFIX,
    B_SUFFIX,
    AdapterError,
    AdapterState,
    LoraFactors,
    resize_rank,
    state_from_dict,
)
from fedlora.strategies.links import NodeLinks
from fedlora.strategies.settings import NoSettings, parse_settings
from fedlora.strategies.weighting import Anomaly, Claim, WeightPolicy, client_weights
from fedlora.wire import protocol
from fedlora.wire.codec import Codec, CompressionError, dense_bytes
from fedlora.wire.message_size import LIMIT_BYTES, MessageTooLargeError, check_message_size
from fedlora.wire.records import NUMPY_STYPE, from_arrayrecord, to_arrayrecord, wire_bytes

# The public API: a strategy plugin needs nothing outside this list (and numpy).
__all__ = [
    "AdapterError",
    "AdapterState",
    "ClientPlan",
    "ClientUpdate",
    "LoraFactors",
    "LoraSpec",
    "LoraStrategy",
    "LowRankTerm",
    "NodeOutcome",
    "ProductSum",
    "RoundReport",
    "StrategyOptions",
    "aggregation_error",
    "average_dense",
    "fingerprint",
    "log",
    "merge_into_base",
    "node_view",
    "protocol",
    "relative_error",
    "resize_rank",
    "seeded_a",
    "state_from_dict",
    "sum_sq_norm",
    "truncated_svd",
    "weighted_average",
]


@dataclass(frozen=True)
class StrategyOptions:
    """Settings every strategy receives; strategy-specific ones go in ``extra``.

    Parameters
    ----------
    lora : LoraSpec
        Rank, alpha, target modules and scaling rule of the global adapter.
    clients_per_round : int (default: 3)
        Nodes sampled for training each round.
    min_replies : int (default: 2)
        Fewest valid replies a round needs; below it the round is skipped and the
        global adapter is left unchanged.
    weighting : str (default: "num-examples")
        ``"num-examples"`` for p_k = n_k / sum n_j, ``"uniform"`` for p_k = 1/K.
    max_weight_share, max_claim_ratio : float (default: 0.5, 10.0)
        Bounds on what one node's claimed example count can buy it
        (:mod:`strategies.weighting`).
    seed : int (default: 0)
        Seeds node sampling and anything random the strategy does.
    fraction_evaluate : float (default: 0.0)
        Fraction of nodes asked to evaluate the global adapter each round.
    node_wait_timeout : float (default: 900.0)
        Seconds to wait for ``clients_per_round`` nodes to connect before sampling
        from those that are there.
    uplink, downlink : Codec (default: identity)
        Compression of the replies and of the training payloads. Handled here, around
        the hooks: a strategy only ever sees dense tensors.
    flower_numpy : bool (default: False)
        Serialise the records in Flower's own numpy form rather than fedlora's raw bytes,
        so that Flower's DP wrappers and mods, which call ``Array.numpy()``, can read them.
    max_message_bytes : int (default: Flower's 2 GiB transport limit)
        A training payload above it is not sent: the node is left out of the round with
        the reason, and a round in which no payload fits raises
        :class:`~fedlora.wire.message_size.MessageTooLargeError`.
    extra : Mapping[str, Any]
        Strategy-specific settings (from the run config).

    """

    lora: LoraSpec
    clients_per_round: int = 3
    min_replies: int = 2
    weighting: str = "num-examples"
    max_weight_share: float = 0.5
    max_claim_ratio: float = 10.0
    seed: int = 0
    fraction_evaluate: float = 0.0
    node_wait_timeout: float = 900.0
    uplink: Codec = field(default_factory=Codec)
    downlink: Codec = field(default_factory=Codec)
    max_message_bytes: int = LIMIT_BYTES
    flower_numpy: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def weight_policy(self) -> WeightPolicy:
        """How the server turns the nodes' claimed example counts into weights."""
        return WeightPolicy(self.weighting, self.max_weight_share, self.max_claim_ratio)


@dataclass(frozen=True)
class ClientPlan:
    """What one node is asked to do this round (sent in its ConfigRecord).

    ``rank``: the LoRA rank it trains. ``freeze_a``: keep lora_A fixed locally.
    ``reinit``: start a fresh adapter (A drawn from ``init_seed``, B = 0) instead of
    loading the received factors (the received dense tensors are still loaded).
    ``a_from_seed``: lora_A is :func:`fedlora.lora.seeded.seeded_a` of ``init_seed`` (so it
    need not be sent). ``send_a``: whether the reply carries lora_A.
    ``merge_rounds``: FLoRA-style stacks (payload keys ``merge/<round>/<key>``) the
    node merges into its base weights, in this order, before training.
    ``config``: any further strategy-specific instructions.
    """

    rank: int
    freeze_a: bool = False
    reinit: bool = False
    init_seed: int = 0
    a_from_seed: bool = False
    send_a: bool = True
    merge_rounds: tuple[int, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """One node's decoded, validated reply: its trained adapter at its own rank.

    ``state.scaling`` is the node's s_k (alpha / r_k), set by the server from the rank,
    never trusted from the reply.
    """

    node_id: int
    num_examples: int
    state: AdapterState
    metrics: Mapping[str, float]
    plan: ClientPlan


@dataclass(frozen=True)
class NodeOutcome:
    """What happened to one node in one round (for the results)."""

    node_id: int
    status: str  # "ok", "dropped" (bad reply), "error" (node failed), "missing" (no reply),
    # "declined" (the node refused, e.g. its privacy budget is spent), "too-large" (its
    # payload exceeded the message limit; not sent)
    reason: str = ""
    num_examples: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    dense_down: int = 0  # the same payloads as dense float32, for comparison
    dense_up: int = 0
    weight: float | None = None  # its p_k in the aggregate (None: not aggregated)


@dataclass
class RoundReport:
    """Everything the server records about one training round."""

    server_round: int
    sampled: list[int] = field(default_factory=list)
    outcomes: list[NodeOutcome] = field(default_factory=list)
    skipped: bool = False
    skip_reason: str = ""
    strategy_error: str = ""
    aggregation_error: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    anomalies: list[Anomaly] = field(default_factory=list)  # claims the server cut

    @property
    def num_ok(self) -> int:
        """Number of replies that were aggregated."""
        return sum(o.status == "ok" for o in self.outcomes)

    @property
    def bytes_up(self) -> int:
        """Payload bytes received from the nodes."""
        return sum(o.bytes_up for o in self.outcomes)

    @property
    def bytes_down(self) -> int:
        """Payload bytes sent to the nodes."""
        return sum(o.bytes_down for o in self.outcomes)

    @property
    def dense_up(self) -> int:
        """What the received replies would weigh as dense float32 tensors."""
        return sum(o.dense_up for o in self.outcomes)

    @property
    def dense_down(self) -> int:
        """What the sent payloads would weigh as dense float32 tensors."""
        return sum(o.dense_down for o in self.outcomes)


def node_view(state: AdapterState, rank: int, scaling: float) -> AdapterState:
    """``state`` as seen by a node of ``rank`` and ``scaling``.

    B is rescaled by s / s_k, then both factors are zero-padded or truncated to ``rank``.
    """
    factor = state.scaling / scaling
    factors = {
        m: resize_rank(LoraFactors(f.a, (f.b * factor).astype(np.float32)), rank)
        for m, f in state.factors.items()
    }
    return AdapterState(factors, state.dense, scaling)


def weighted_average(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_k w_k x_k, summed in float64, returned as float32.

    Each product w_k x_k is formed in float32 (within one float32 ulp of exact) and added
    to a float64 accumulator, so no float64 copy of a client's tensor is made: the
    updates stream through once, about 1.5x a plain float32 weighted sum
    (simulations/bench_aggregation.py). The error is at most one float32 rounding of
    each product, 2^-24 sum_k |w_k x_k|, plus the final rounding to float32.
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


def aggregation_error(
    updates: Sequence[ClientUpdate], weights: Sequence[float], state: AdapterState
) -> float:
    """Relative error of ``state`` against the exact average of the clients' products."""
    modules = sorted(state.factors)
    target: list[list[LowRankTerm]] = []
    approx: list[list[LowRankTerm]] = []
    for m in modules:
        target.append(
            [
                (float(w) * u.state.scaling, u.state.factors[m].b, u.state.factors[m].a)
                for u, w in zip(updates, weights, strict=True)
            ]
        )
        approx.append([(state.scaling, state.factors[m].b, state.factors[m].a)])
    return relative_error(target, approx)


class LoraStrategy(Strategy):
    """Base class of every fedlora strategy (built-in or plugin).

    Subclasses set ``name`` and ``description`` and implement :meth:`aggregate`.
    Class attributes declare what the conformance kit and the docs may claim:
    ``exact`` (aggregation error is zero up to float error),
    ``heterogeneous_ranks`` (clients may train at different ranks) and ``central_dp``:
    the modes of Flower's central-DP wrappers the strategy composes with. ``"client"``
    holds when :meth:`aggregate` is the plain mean of the tensors the nodes sent (then
    noise z C / m on it is the Gaussian mechanism the wrapper claims); ``"server"`` also
    needs each reply to carry every tensor of the global adapter in its order, since the
    wrapper clips a reply against the global record position by position.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    heterogeneous_ranks: ClassVar[bool] = False
    central_dp: ClassVar[frozenset[str]] = frozenset()
    Settings: ClassVar[type] = NoSettings
    """The strategy's own settings: a frozen dataclass filled from ``strategy-options``."""

    def __init__(self, options: StrategyOptions) -> None:
        self.options = options
        self.settings = parse_settings(type(self).Settings, options.extra, self.name)
        self._rng = np.random.default_rng(options.seed)
        self._plans: dict[int, ClientPlan] = {}
        self._sent_bytes: dict[int, tuple[int, int]] = {}  # node -> (actual, dense fp32)
        self._not_sent: dict[int, str] = {}  # node -> why its payload was not sent
        self._sent: list[Message] = []  # this round's training messages
        self._sent_to: dict[str, int] | None = None  # message id -> node, once pushed
        self._layouts: dict[int, list[tuple[str, tuple[int, ...]]]] = {}  # what each was sent
        self._global_record = ArrayRecord()
        self._screened: set[int] = set()  # nodes whose reply screen_replies set aside
        self.links = NodeLinks(options.uplink, options.downlink)
        self._decode_seconds = 0.0
        self._current: AdapterState | None = None
        self._round_started = 0.0
        self.last_report: RoundReport | None = None
        self.excluded_nodes: dict[int, str] = {}
        self.node_ranks: dict[int, int] = {}
        self.node_partitions: dict[int, int] = {}  # the partition id a node reported
        self.node_examples: dict[int, int] = {}  # the training examples a node declared
        self._full_sample_seen = False  # clients-per-round nodes were connected once

    # ------------------------------------------------------------------ #
    # The one required method                                            #
    # ------------------------------------------------------------------ #
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
        adapter the clients started from. Must not modify its inputs. The result must
        adapt the same modules as ``current``.
        """

    # ------------------------------------------------------------------ #
    # Optional hooks                                                     #
    # ------------------------------------------------------------------ #
    def initial_state(self, state: AdapterState) -> AdapterState:
        """Adjust the freshly initialised global adapter before round 1 (default: as is)."""
        return state

    def client_plan(self, server_round: int, node_id: int) -> ClientPlan:
        """Instructions for ``node_id`` this round (default: train A and B at its rank)."""
        return ClientPlan(rank=self.node_rank(node_id), init_seed=self.options.seed)

    def payload(
        self, server_round: int, node_id: int, plan: ClientPlan, current: AdapterState
    ) -> dict[str, np.ndarray]:
        """Tensors sent to ``node_id`` (default: the global adapter at the node's rank).

        Zero-padding or truncation to r_k, with the scaling folded into B so that
        s_k B_k A_k matches s B A on the kept components (HetLoRA-style).
        """
        return node_view(current, plan.rank, self.scaling(plan.rank)).to_state_dict()

    def decode_update(
        self,
        server_round: int,
        plan: ClientPlan,
        tensors: Mapping[str, np.ndarray],
        current: AdapterState,
    ) -> AdapterState:
        """Turn a reply's tensors into the node's full adapter (default: as sent).

        A strategy that does not ship some tensors (FFA-LoRA's frozen A) rebuilds them
        here. The state's scaling is the node's own s_k.
        """
        return state_from_dict(tensors, self.scaling(plan.rank))

    def restore_fixed(self, state: AdapterState) -> AdapterState:
        """The decoded global adapter with what the strategy holds fixed put back (default: as is).

        A wrapper may perturb every tensor it returns (Flower's central-DP noise); a strategy
        whose nodes rebuild a tensor themselves (FFA-LoRA's seeded A) restores it here.
        """
        return state

    def accept_update(self, server_round: int, update: ClientUpdate) -> str | None:
        """Veto a decoded, well-formed update: return a reason to drop it (default: accept)."""
        return None

    def base_delta(self) -> Mapping[str, np.ndarray] | None:
        """Per-module deltas merged into the base weights under the global adapter.

        ``None`` (default) means the global adapter sits on the original base. FLoRA
        returns the sum of the stacks merged so far; evaluation and export apply it.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """Strategy state to checkpoint (JSON-serialisable values or numpy arrays).

        A subclass with state of its own extends the dict returned by ``super()``.
        """
        return {
            "rng": self._rng.bit_generator.state,
            "node_ranks": {str(k): v for k, v in self.node_ranks.items()},
            "node_partitions": {str(k): v for k, v in self.node_partitions.items()},
            "excluded_nodes": {str(k): v for k, v in self.excluded_nodes.items()},
            "node_examples": {str(k): v for k, v in self.node_examples.items()},
            "links": self.links.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if "rng" in state:
            self._rng.bit_generator.state = state["rng"]
        self.node_ranks = {int(k): int(v) for k, v in state.get("node_ranks", {}).items()}
        self.node_partitions = {int(k): int(v) for k, v in state.get("node_partitions", {}).items()}
        self.excluded_nodes = {int(k): str(v) for k, v in state.get("excluded_nodes", {}).items()}
        self.node_examples = {int(k): int(v) for k, v in state.get("node_examples", {}).items()}
        self.links.load_state_dict(state.get("links", {}))

    def extra_round_metrics(
        self,
        updates: Sequence[ClientUpdate],
        weights: np.ndarray,
        current: AdapterState,
        result: AdapterState,
    ) -> dict[str, float]:
        """Further per-round numbers to record (default: none)."""
        return {}

    # ------------------------------------------------------------------ #
    # Helpers for strategies and the server                              #
    # ------------------------------------------------------------------ #
    def scaling(self, rank: int) -> float:
        """The LoRA scaling s at ``rank`` (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
        return self.options.lora.with_rank(rank).scaling

    def node_rank(self, node_id: int) -> int:
        """The rank ``node_id`` trains at: its declared rank, else the run's rank."""
        return self.node_ranks.get(node_id, self.options.lora.rank)

    def register_node(self, node_id: int, rank: int) -> None:
        """Record a node's declared rank (from its reply to the server's query)."""
        if rank <= 0 or rank > self.options.lora.rank:
            self.exclude_node(
                node_id, f"declared rank {rank} is outside [1, lora-rank={self.options.lora.rank}]"
            )
            return
        if rank != self.options.lora.rank and not self.heterogeneous_ranks:
            self.exclude_node(
                node_id,
                f"declared rank {rank} differs from lora-rank={self.options.lora.rank} and "
                f"strategy '{self.name}' does not support heterogeneous ranks",
            )
            return
        self.node_ranks[node_id] = rank

    def global_state(self, arrays: ArrayRecord) -> AdapterState:
        """Decode the global ArrayRecord (the strategy's own rank and scaling)."""
        tensors = from_arrayrecord(arrays)
        state = state_from_dict(tensors, 1.0)
        return self.restore_fixed(
            AdapterState(state.factors, state.dense, self.scaling(state.rank))
        )

    def discover_nodes(self, grid: Grid, config: ConfigRecord, timeout: float) -> None:
        """Ask connected nodes not seen before to describe themselves (their rank).

        One QUERY message per new node, once per run; a node that does not answer is
        asked again next round and meanwhile trains at the run's rank.
        """
        self.wait_for_nodes(grid, self._nodes_to_wait_for(self.options.clients_per_round))
        seen = set(self.node_ranks) | set(self.excluded_nodes)
        new = sorted(n for n in grid.get_node_ids() if n not in seen)
        if not new:
            return
        messages = [
            Message(
                RecordDict({protocol.CONFIG: ConfigRecord(dict(config))}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in new
        ]
        for msg in grid.send_and_receive(messages, timeout=timeout):
            node_id = msg.metadata.src_node_id
            if msg.has_error() or protocol.METRICS not in msg.content.metric_records:
                reason = msg.error.reason if msg.has_error() else "no metrics in reply"
                if "ConfigError" in reason:  # its settings are wrong: retrying cannot help
                    self.exclude_node(node_id, f"invalid configuration: {reason}")
                else:
                    log(WARNING, "Node %s did not describe itself: %s", node_id, reason)
                continue
            info = msg.content.metric_records[protocol.METRICS]
            rank = whole_number(info, protocol.NODE_RANK, self.options.lora.rank)
            partition = whole_number(info, protocol.NODE_PARTITION, -1)
            examples = whole_number(info, protocol.NUM_EXAMPLES, 0)
            if rank is None or partition is None or examples is None:
                self.exclude_node(node_id, f"its description is not whole numbers: {dict(info)}")
                continue
            if partition >= 0:
                self.node_partitions[node_id] = partition
            if examples > 0:
                self.node_examples[node_id] = examples
            self.register_node(node_id, rank)
        log(INFO, "Node ranks: %s", dict(sorted(self.node_ranks.items())))

    def wait_for_nodes(self, grid: Grid, count: int) -> list[int]:
        """Connected, non-excluded nodes, after waiting for ``count`` nodes to connect.

        Waits at most ``node_wait_timeout``; excluded nodes count as connected (waiting
        would not bring them back).
        """
        deadline = time.monotonic() + self.options.node_wait_timeout
        while True:
            connected = sorted(grid.get_node_ids())
            if len(connected) >= self.options.clients_per_round:
                self._full_sample_seen = True
            if len(connected) >= count or time.monotonic() >= deadline:
                return [n for n in connected if n not in self.excluded_nodes]
            log(INFO, "Waiting for nodes: %d connected, %d wanted", len(connected), count)
            time.sleep(1.0)

    def _nodes_to_wait_for(self, count: int) -> int:
        """Until a full sample has connected once, ``count``; then only ``min-replies``.

        A node that died stays gone: waiting for it would cost every later round the
        whole timeout, so once the federation has been complete the round goes on as
        soon as enough nodes are there to aggregate.
        """
        return count if not self._full_sample_seen else min(count, self.options.min_replies)

    def exclude_node(self, node_id: int, reason: str) -> None:
        """Stop sampling ``node_id`` (for example: its privacy budget is spent)."""
        if node_id not in self.excluded_nodes:
            log(WARNING, "Node %s excluded from sampling: %s", node_id, reason)
        self.excluded_nodes[node_id] = reason

    def sample_nodes(self, grid: Grid, count: int) -> list[int]:
        """Sample ``count`` connected nodes with the strategy's own seeded generator.

        Waits up to ``node_wait_timeout`` seconds for enough nodes to connect (all
        ``count`` until they have been there once, then ``min-replies``), then samples
        from those present.
        """
        # Flower draws node ids at random; ordering by the partition a node reported makes
        # the same seed sample the same data in every launch of a simulation.
        nodes = sorted(
            self.wait_for_nodes(grid, self._nodes_to_wait_for(count)),
            key=lambda n: (self.node_partitions.get(n, 2**62), n),
        )
        if not nodes:
            return []
        chosen = self._rng.choice(len(nodes), size=min(count, len(nodes)), replace=False)
        return [nodes[i] for i in sorted(chosen)]

    # ------------------------------------------------------------------ #
    # Flower Strategy hooks, written once                                #
    # ------------------------------------------------------------------ #
    def summary(self) -> None:
        """Log the configuration."""
        o = self.options
        log(INFO, "\t├──> Strategy: %s (%s)", self.name or type(self).__name__, self.description)
        log(
            INFO,
            "\t│\t├── LoRA: r=%d alpha=%s targets=%s",
            o.lora.rank,
            o.lora.alpha,
            ",".join(o.lora.target_modules),
        )
        log(
            INFO,
            "\t│\t├── clients per round: %d, min replies: %d",
            o.clients_per_round,
            o.min_replies,
        )
        log(INFO, "\t│\t└── weighting: %s, exact: %s", o.weighting, self.exact)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and build one message per node with its payload and plan."""
        self._round_started = time.monotonic()
        current = self.global_state(arrays)
        self._current = current
        nodes = self.sample_nodes(grid, self.options.clients_per_round)
        self.last_report = RoundReport(server_round=server_round, sampled=list(nodes))
        self._decode_seconds = 0.0
        self._plans.clear()
        self._sent_bytes.clear()
        self._not_sent.clear()
        self._layouts.clear()
        self._screened.clear()
        self._sent_to = None
        self._global_record = arrays
        messages = []
        for node_id in nodes:
            plan = self.client_plan(server_round, node_id)
            payload = self.payload(server_round, node_id, plan, current)
            wire, link_config = self.links.send(server_round, node_id, payload)
            record = to_arrayrecord(wire, flower_numpy=self.options.flower_numpy)
            node_config = ConfigRecord(dict(config) | link_config)
            node_config[protocol.SERVER_ROUND] = server_round
            node_config[protocol.RANK] = plan.rank
            node_config[protocol.FREEZE_A] = plan.freeze_a
            node_config[protocol.REINIT] = plan.reinit
            node_config[protocol.INIT_SEED] = plan.init_seed
            node_config[protocol.A_FROM_SEED] = plan.a_from_seed
            node_config[protocol.SEND_A] = plan.send_a
            node_config[protocol.MERGE_ROUNDS] = [int(r) for r in plan.merge_rounds]
            for key, value in plan.config.items():
                node_config[key] = value
            nbytes = wire_bytes(record)
            try:
                check_message_size(
                    nbytes,
                    wire,
                    self.options.max_message_bytes,
                    f"training payload for node {node_id} in round {server_round}",
                )
            except MessageTooLargeError as err:
                log(WARNING, "Node %s left out of round %d: %s", node_id, server_round, err)
                self.links.settle(node_id, replied=False)
                self._not_sent[node_id] = str(err)
                self.last_report.outcomes.append(
                    NodeOutcome(node_id, "too-large", str(err), dense_down=dense_bytes_of(payload))
                )
                continue
            self._plans[node_id] = plan
            self._layouts[node_id] = _layout(record)
            self._sent_bytes[node_id] = (nbytes, dense_bytes_of(payload))
            content = RecordDict({protocol.ARRAYS: record, protocol.CONFIG: node_config})
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        self._sent = messages
        if nodes and not messages and self._not_sent:
            raise MessageTooLargeError(next(iter(self._not_sent.values())))
        log(INFO, "configure_train: round %d, sampled nodes %s", server_round, nodes)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, aggregate the valid ones, measure and report."""
        report = self.last_report or RoundReport(server_round=server_round)
        current = self._current
        if current is None:
            raise RuntimeError("aggregate_train called before configure_train")
        updates: list[ClientUpdate] = []
        seen: set[int] = set(self._screened)
        for msg in replies:
            node_id = self._sender(msg)
            seen.add(node_id)
            outcome, update = self._decode_reply(server_round, node_id, msg, current)
            report.outcomes.append(outcome)
            if update is not None:
                updates.append(update)
        for node_id in report.sampled:
            if node_id not in seen and node_id not in self._not_sent:
                down, dense_down = self._sent_bytes.get(node_id, (0, 0))
                self.links.settle(node_id, replied=False)
                report.outcomes.append(
                    NodeOutcome(
                        node_id,
                        "missing",
                        "no reply before the round timeout",
                        bytes_down=down,
                        dense_down=dense_down,
                    )
                )
        result = self._aggregate_valid(server_round, updates, current, report)
        report.seconds = time.monotonic() - self._round_started
        self.last_report = report
        metrics = MetricRecord(
            {
                "num-ok": report.num_ok,
                "num-failed": len(report.outcomes) - report.num_ok,
                "bytes-up": report.bytes_up,
                "bytes-down": report.bytes_down,
                "dense-up": report.dense_up,
                "dense-down": report.dense_down,
                **({} if report.skipped else {"aggregation-error": report.aggregation_error}),
                **report.metrics,
            }
        )
        if result is None:
            return None, metrics
        return to_arrayrecord(
            result.to_state_dict(), flower_numpy=self.options.flower_numpy
        ), metrics

    def screen_replies(
        self, server_round: int, replies: Iterable[Message], *, whole: bool = False
    ) -> list[Message]:
        """Set aside the replies that a wrapper around this strategy must not see.

        Flower's DP wrappers skip the whole round when any node failed; the server-side
        one clips every array record of a reply against the global record, position by
        position, and fails deep in numpy (or divides by zero) on anything unexpected.
        Node errors, replies at a rank other than the run's, and replies whose tensors
        are not, in order and shape, those the node was sent (``whole``: those of the
        global adapter, in Flower's numpy form, with a non-zero update) are recorded here
        as outcomes and left out; :meth:`aggregate_train` then takes the rest.
        """
        report = self.last_report or RoundReport(server_round=server_round)
        self.last_report = report
        kept = []
        for msg in replies:
            node_id = self._sender(msg)
            try:
                status, reason = self._set_aside(node_id, msg, whole)
            except Exception as err:  # nothing one reply holds may end the round
                status, reason = "dropped", f"unreadable reply ({type(err).__name__}: {err})"
            if not reason:
                kept.append(msg)
                continue
            log(
                WARNING, "Round %d: reply from node %s set aside: %s", server_round, node_id, reason
            )
            self._screened.add(node_id)
            self.links.settle(node_id, replied=status == "dropped")
            down, dense_down = self._sent_bytes.get(node_id, (0, 0))
            up = 0 if msg.has_error() else _reply_bytes(msg)
            report.outcomes.append(
                NodeOutcome(
                    node_id, status, reason, bytes_down=down, dense_down=dense_down, bytes_up=up
                )
            )
        return kept

    def _sender(self, msg: Message) -> int:
        """The node a reply answers for, matched by message id where the grid set one.

        A reply the SuperLink makes for a lost node is not from that node. The ids exist
        once the grid has pushed the messages, so the map is built at the first reply.
        """
        if self._sent_to is None:
            self._sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
            self._sent_to.pop("", None)
        return self._sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    def _set_aside(self, node_id: int, msg: Message, whole: bool) -> tuple[str, str]:
        """(status, reason) for a reply :meth:`screen_replies` leaves out; ("", "") keeps it."""
        if msg.has_error():
            return "error", msg.error.reason
        plan = self._plans.get(node_id)
        if plan is not None and plan.rank != self.options.lora.rank:
            return (
                "dropped",
                f"rank {plan.rank}: every node must train at lora-rank={self.options.lora.rank}",
            )
        records = msg.content.array_records
        if not records:  # a decline, or a reply without tensors: validated as usual
            return "", ""
        if set(records) != {protocol.ARRAYS}:
            return "dropped", f"array records {sorted(records)}, expected only '{protocol.ARRAYS}'"
        expected = _layout(self._global_record) if whole else self._layouts.get(node_id, [])
        against = "global adapter" if whole else "tensors sent"
        got = _layout(records[protocol.ARRAYS])
        if got != expected:
            difference = _first_difference(got, expected)
            return (
                "dropped",
                f"{difference} (the wrapper pairs them with the {against} by position)",
            )
        if not whole:
            return "", ""
        odd = [k for k, a in records[protocol.ARRAYS].items() if a.stype != NUMPY_STYPE]
        if odd:  # Flower's clipping calls Array.numpy(), which reads nothing else
            return "dropped", f"tensor '{odd[0]}' is not in Flower's numpy form"
        try:
            tensors = list(from_arrayrecord(records[protocol.ARRAYS]).values())
            reference = list(from_arrayrecord(self._global_record).values())
            if [t.shape for t in tensors] != [r.shape for r in reference]:
                raise ValueError("the data do not have the declared shapes")
            if not all(np.issubdtype(t.dtype, np.floating) for t in tensors):
                raise ValueError("a tensor is not floating point")
            norm_sq = sum(
                float(np.sum(np.square(t - r))) for t, r in zip(tensors, reference, strict=True)
            )
        # Flower's clipping reads only its own numpy form: anything else fails there
        except (AdapterError, TypeError, ValueError) as err:
            return "dropped", f"tensors unreadable for server-side clipping: {err}"
        if norm_sq == 0.0:
            return "dropped", "update is exactly zero (Flower's clipping divides by its norm)"
        return "", ""

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask a fraction of the nodes to evaluate the global adapter on their own data."""
        if self.options.fraction_evaluate <= 0.0:
            return []
        available = [n for n in grid.get_node_ids() if n not in self.excluded_nodes]
        count = max(1, round(len(available) * self.options.fraction_evaluate))
        nodes = self.sample_nodes(grid, count)
        current = self.global_state(arrays)
        eval_config = ConfigRecord(dict(config))
        eval_config[protocol.SERVER_ROUND] = server_round
        eval_config[protocol.RANK] = current.rank
        record = RecordDict(
            {protocol.ARRAYS: to_arrayrecord(current.to_state_dict()), protocol.CONFIG: eval_config}
        )
        return [Message(record, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the nodes' evaluation metrics."""
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        count = 0
        for msg in replies:
            m = None if msg.has_error() else msg.content.metric_records.get(protocol.METRICS)
            n = None if m is None else whole_number(m, protocol.NUM_EXAMPLES, 0)
            if m is None or n is None:
                reason = msg.error.reason if msg.has_error() else "no metrics, or a bad count"
                log(
                    WARNING,
                    "Evaluation reply from node %s ignored: %s",
                    msg.metadata.src_node_id,
                    reason,
                )
                continue
            if n <= 0:
                continue
            count += n
            for key in (protocol.EVAL_LOSS, protocol.EVAL_ACCURACY):
                value = m.get(key, float("nan"))
                if isinstance(value, int | float) and np.isfinite(value):
                    totals[key] = totals.get(key, 0.0) + n * value
                    counts[key] = counts.get(key, 0) + n
        if count == 0:
            return None
        means = {k: v / counts[k] for k, v in totals.items()}
        return MetricRecord(means | {"num-examples": count})

    # ------------------------------------------------------------------ #
    # Internals                                                          #
    # ------------------------------------------------------------------ #
    def _decode_reply(
        self, server_round: int, node_id: int, msg: Message, current: AdapterState
    ) -> tuple[NodeOutcome, ClientUpdate | None]:
        down, dense_down = self._sent_bytes.get(node_id, (0, 0))
        if msg.has_error():  # the node may not hold the payload: the next one goes dense
            self.links.settle(node_id, replied=False)
            error = NodeOutcome(
                node_id, "error", msg.error.reason, bytes_down=down, dense_down=dense_down
            )
            return error, None
        up = _reply_bytes(msg)
        try:
            outcome, update = self._validate_reply(server_round, node_id, msg, current)
        except Exception as err:  # nothing one reply holds may end the round
            reason = f"unreadable reply ({type(err).__name__}: {err})"
            log(WARNING, "Round %d: reply from node %s dropped: %s", server_round, node_id, reason)
            outcome, update = NodeOutcome(node_id, "dropped", reason), None
        # after decoding: the uplink is decoded against what this node received, which
        # settling forgets. A node whose reply is rejected still holds this payload.
        self.links.settle(node_id, replied=True)
        plan = update.plan if update is not None else None
        dense_up = 0 if plan is None else dense_bytes(_reply_shapes(plan, current).values())
        outcome = replace(
            outcome, bytes_down=down, dense_down=dense_down, bytes_up=up, dense_up=dense_up
        )
        return outcome, update

    def _validate_reply(
        self, server_round: int, node_id: int, msg: Message, current: AdapterState
    ) -> tuple[NodeOutcome, ClientUpdate | None]:
        plan = self._plans.get(node_id)
        if plan is None:
            return NodeOutcome(node_id, "dropped", "reply from a node that was not sampled"), None
        content = msg.content
        reply_metrics = content.metric_records.get(protocol.METRICS)
        if reply_metrics is not None and reply_metrics.get(protocol.DECLINED):
            config = content.config_records.get(protocol.CONFIG)
            reason = str(config.get(protocol.REASON, "declined")) if config else "declined"
            self.exclude_node(node_id, reason)
            return NodeOutcome(node_id, "declined", reason), None
        try:
            if protocol.ARRAYS not in content.array_records:
                raise AdapterError(f"reply has no '{protocol.ARRAYS}' ArrayRecord")
            if protocol.METRICS not in content.metric_records:
                raise AdapterError(f"reply has no '{protocol.METRICS}' MetricRecord")
            metrics = {
                k: float(v)
                for k, v in content.metric_records[protocol.METRICS].items()
                if isinstance(v, int | float)
            }
            if protocol.NUM_EXAMPLES not in content.metric_records[protocol.METRICS]:
                raise AdapterError(f"reply metrics lack '{protocol.NUM_EXAMPLES}'")
            n = whole_number(content.metric_records[protocol.METRICS], protocol.NUM_EXAMPLES, 0)
            if n is None or n < 1:
                raw = content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES]
                raise AdapterError(
                    f"'{protocol.NUM_EXAMPLES}' is {raw!r}: a reply must claim a whole number "
                    "of examples, at least 1"
                )
            started = time.perf_counter()
            tensors = self.links.receive(
                node_id,
                from_arrayrecord(content.array_records[protocol.ARRAYS]),
                _reply_shapes(plan, current),
                rank=plan.rank,
                reinit=plan.reinit,
                a_from_seed=plan.a_from_seed,
                init_seed=plan.init_seed,
            )
            self._decode_seconds += time.perf_counter() - started
            state = self.decode_update(server_round, plan, tensors, current)
            _check_against(state, current, plan.rank)
            state.check_finite()
            update = ClientUpdate(node_id, int(n), state, metrics, plan)
            veto = self.accept_update(server_round, update)
            if veto is not None:
                raise AdapterError(veto)
        except (AdapterError, CompressionError, ValueError, KeyError, TypeError) as err:
            log(WARNING, "Round %d: reply from node %s dropped: %s", server_round, node_id, err)
            return NodeOutcome(node_id, "dropped", str(err)), None
        except MemoryError:  # what the reply declares does not fit: it is not aggregated
            reason = "reply does not fit in memory (MemoryError while decoding)"
            log(WARNING, "Round %d: reply from node %s dropped: %s", server_round, node_id, reason)
            return NodeOutcome(node_id, "dropped", reason), None
        return NodeOutcome(node_id, "ok", "", int(n), metrics=metrics), update

    def _weights(self, updates: Sequence[ClientUpdate], report: RoundReport) -> np.ndarray | None:
        """The p_k of this round's valid updates, their claims bounded; anomalies recorded."""
        claims = [
            Claim(u.node_id, u.num_examples, self.node_examples.get(u.node_id)) for u in updates
        ]
        weights, anomalies = client_weights(claims, self.options.weight_policy)
        for a in anomalies:
            log(
                WARNING,
                "Round %d: node %s's weight cut: %s; counted as %g",
                report.server_round,
                a.node_id,
                a.reason,
                a.used,
            )
        report.anomalies.extend(anomalies)
        return weights

    def _aggregate_valid(
        self,
        server_round: int,
        updates: list[ClientUpdate],
        current: AdapterState,
        report: RoundReport,
    ) -> AdapterState | None:
        weights = self._weights(updates, report) if updates else None
        if len(updates) < self.options.min_replies or weights is None:
            report.skipped = True
            report.skip_reason = (
                f"{len(updates)} valid replies, fewer than min-replies={self.options.min_replies}"
                if weights is not None or not updates
                else "all valid replies carry zero examples"
            )
            log(
                WARNING,
                "Round %d skipped: %s; global adapter unchanged",
                server_round,
                report.skip_reason,
            )
            return None
        try:
            result = self.aggregate(server_round, updates, weights, current)
            _check_against(result, current, None)
            result.check_finite()
        except Exception as err:  # a plugin's bug must not corrupt the global adapter
            name = f"{self.name or '?'}' ({type(self).__module__}.{type(self).__qualname__})"
            report.skipped = True
            report.strategy_error = f"{type(err).__name__}: {err}"
            report.skip_reason = f"strategy '{name} failed: {report.strategy_error}"
            log(WARNING, "Round %d: %s; global adapter unchanged", server_round, report.skip_reason)
            return None
        by_node = {u.node_id: float(w) for u, w in zip(updates, weights, strict=True)}
        report.outcomes = [
            replace(o, weight=by_node[o.node_id]) if o.status == "ok" else o
            for o in report.outcomes
        ]
        report.aggregation_error = aggregation_error(updates, weights, result)
        report.metrics.update(_weighted_client_metrics(updates, weights))
        report.metrics.update(self.extra_round_metrics(updates, weights, current, result))
        report.metrics["decode-seconds"] = self._decode_seconds
        log(
            INFO,
            "Round %d aggregated %d replies, aggregation error %.3e",
            server_round,
            len(updates),
            report.aggregation_error,
        )
        return result


def whole_number(metrics: Mapping[str, Any], key: str, default: int) -> int | None:
    """``metrics[key]`` as an int (``default`` when absent); None unless a finite whole number.

    Metrics come from peers: a list, a NaN or 1e300 must not reach ``int()``.
    """
    value = metrics.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value != int(value) or abs(value) > 2**53:
        return None
    return int(value)


def _reply_bytes(msg: Message) -> int:
    """Payload bytes of a reply as it crossed the wire (0 when unreadable)."""
    try:
        return sum(wire_bytes(r) for r in msg.content.array_records.values())
    except Exception:  # counted as nothing; the reply itself is judged elsewhere
        return 0


def _weighted_client_metrics(updates: Sequence[ClientUpdate], weights: np.ndarray) -> dict:
    out: dict[str, float] = {}
    for key in (protocol.TRAIN_LOSS, protocol.TRAIN_LOSS_FIRST):
        values = [(w, u.metrics.get(key)) for u, w in zip(updates, weights, strict=True)]
        if all(v is not None and np.isfinite(v) for _, v in values):
            out[key] = float(sum(w * v for w, v in values))
    seconds = [u.metrics.get(protocol.TRAIN_SECONDS, 0.0) for u in updates]
    out["max-train-seconds"] = float(max(seconds))
    return out


def _reply_shapes(plan: ClientPlan, current: AdapterState) -> dict[str, tuple[int, ...]]:
    """The tensors a node's reply carries, at the shapes its plan asks for."""
    shapes: dict[str, tuple[int, ...]] = {}
    for module, f in current.factors.items():
        if plan.send_a:
            shapes[module + A_SUFFIX] = (plan.rank, f.a.shape[1])
        shapes[module + B_SUFFIX] = (f.b.shape[0], plan.rank)
    shapes.update({k: tuple(v.shape) for k, v in current.dense.items()})
    return shapes


def _layout(record: ArrayRecord) -> list[tuple[str, tuple[int, ...]]]:
    """Keys and shapes of a record, in order (what Flower's wrappers pair by position)."""
    return [(key, tuple(int(d) for d in array.shape)) for key, array in record.items()]


def _first_difference(
    got: Sequence[tuple[str, tuple[int, ...]]], expected: Sequence[tuple[str, tuple[int, ...]]]
) -> str:
    """Where two layouts part, in words (for the reason a reply is set aside)."""
    for i, (g, e) in enumerate(zip(got, expected, strict=False)):
        if g != e:
            return f"tensor {i} is '{g[0]}' {list(g[1])}, expected '{e[0]}' {list(e[1])}"
    return f"{len(got)} tensors, expected {len(expected)}"


def dense_bytes_of(tensors: Mapping[str, np.ndarray]) -> int:
    """Bytes of ``tensors`` as dense float32 (the uncompressed reference)."""
    return dense_bytes(np.shape(v) for v in tensors.values())


def _check_against(state: AdapterState, reference: AdapterState, rank: int | None) -> None:
    """Same modules and dense keys as ``reference``, compatible shapes, rank as asked."""
    if set(state.factors) != set(reference.factors):
        missing = sorted(set(reference.factors) - set(state.factors))
        extra = sorted(set(state.factors) - set(reference.factors))
        raise AdapterError(f"LoRA modules differ: missing {missing[:2]}, unexpected {extra[:2]}")
    if set(state.dense) != set(reference.dense):
        raise AdapterError(
            f"dense tensors differ: expected {sorted(reference.dense)[:3]}, got "
            f"{sorted(state.dense)[:3]}"
        )
    for module, ref in reference.factors.items():
        got = state.factors[module]
        if rank is not None and got.rank != rank:
            raise AdapterError(
                f"module '{module}' has rank {got.rank}, the node was asked for {rank}"
            )
        if got.a.shape[1] != ref.a.shape[1] or got.b.shape[0] != ref.b.shape[0]:
            raise AdapterError(
                f"module '{module}': lora_A {got.a.shape} / lora_B {got.b.shape} do not fit "
                f"the model ({ref.b.shape[0]} x {ref.a.shape[1]})"
            )
    for key, ref_value in reference.dense.items():
        if state.dense[key].shape != ref_value.shape:
            raise AdapterError(
                f"tensor '{key}' has shape {state.dense[key].shape}, expected {ref_value.shape}"
            )
