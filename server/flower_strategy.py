"""The Flower round around a LoRA strategy: a Flower ``Strategy`` that wraps a ``LoraStrategy``.

:class:`LoraFlowerStrategy` is where ArrayRecords and Messages meet the strategy's pure
hooks. ``configure_train`` asks new nodes to describe themselves, samples the round's
nodes, and sends each its plan and payload through its link (codec, size limit);
``aggregate_train`` reads every reply (:mod:`fedlora.server.replies`), bounds the claimed
example counts (:mod:`fedlora.server.weights`), calls the strategy's ``aggregate`` and
checks what it returns, and reports the round (:mod:`fedlora.server.reports`). It is an
ordinary Flower strategy: Flower's central-DP wrappers wrap it, and Flower's own
``Strategy.start`` could run it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.lora.server_optimizer import ServerOptimizer, ServerOptimizerSpec, step_norm
from fedlora.lora.state import AdapterState, state_from_dict
from fedlora.secagg.protocol import SecAggParams
from fedlora.server import nodes as node_ops
from fedlora.server.aggregation import aggregate_round, aggregate_secure_sum
from fedlora.server.federated_eval import evaluation_messages, mean_evaluation
from fedlora.server.link_state import NodeLinks
from fedlora.server.nodes import NodeRegistry
from fedlora.server.peer import error_reason
from fedlora.server.replies import (
    layout,
    read_reply,
    reply_bytes,
    screen_for_wrapper,
)
from fedlora.server.reports import NodeOutcome, RoundReport, round_metrics
from fedlora.server.secure_aggregation import secure_round
from fedlora.server.weights import Claim, WeightPolicy, client_weights
from fedlora.strategies.api import ClientPlan, ClientUpdate, LoraStrategy, logger
from fedlora.wire import protocol
from fedlora.wire.codec import Codec, dense_bytes
from fedlora.wire.message_size import LIMIT_BYTES, MessageTooLargeError, check_message_size
from fedlora.wire.records import from_arrayrecord, to_arrayrecord, wire_bytes


@dataclass(frozen=True)
class RoundOptions:
    """How the server runs each round (none of it is a strategy's business).

    Parameters
    ----------
    clients_per_round : int (default: 3)
        Nodes sampled for training each round.
    min_replies : int (default: 2)
        Fewest valid replies a round needs; with fewer the round is skipped and the
        global adapter is left unchanged.
    weights : WeightPolicy
        How claimed example counts become the weights p_k, and their bounds.
    seed : int (default: 0)
        Seeds node sampling.
    fraction_evaluate : float (default: 0.0)
        Fraction of nodes asked to evaluate the global adapter each round.
    node_wait_timeout : float (default: 900.0)
        Seconds to wait for enough nodes to connect before sampling those that are there.
    uplink, downlink : Codec (default: identity)
        Compression of replies and of training payloads; the strategy sees dense tensors.
    max_message_bytes : int (default: Flower's 2 GiB limit)
        A payload above it is not sent: its node is left out of the round, with the reason.
    flower_numpy : bool (default: False)
        Records in Flower's own numpy form, which its DP wrappers and mods can read.
    server_optimizer : ServerOptimizerSpec (default: none)
        FedAvgM, FedAdam or FedYogi stepping the global adapter along the strategy's
        aggregate minus the adapter the round started from.

    """

    clients_per_round: int = 3
    min_replies: int = 2
    weights: WeightPolicy = field(default_factory=WeightPolicy)
    seed: int = 0
    fraction_evaluate: float = 0.0
    node_wait_timeout: float = 900.0
    uplink: Codec = field(default_factory=Codec)
    downlink: Codec = field(default_factory=Codec)
    max_message_bytes: int = LIMIT_BYTES
    flower_numpy: bool = False
    server_optimizer: ServerOptimizerSpec = field(default_factory=ServerOptimizerSpec)


@dataclass
class OpenRound:
    """The bookkeeping of the training round under way: what was sent to whom."""

    report: RoundReport
    current: AdapterState
    global_record: ArrayRecord
    started: float = field(default_factory=time.monotonic)
    plans: dict[int, ClientPlan] = field(default_factory=dict)
    sent_bytes: dict[int, tuple[int, int]] = field(default_factory=dict)  # (actual, dense)
    layouts: dict[int, list[tuple[str, tuple[int, ...]]]] = field(default_factory=dict)
    not_sent: set[int] = field(default_factory=set)
    messages: list[Message] = field(default_factory=list)
    screened: set[int] = field(default_factory=set)
    _sent_to: dict[str, int] | None = None

    def sender(self, msg: Message) -> int:
        """The node a reply answers for, matched by message id where the grid set one.

        A reply the SuperLink makes for a lost node is not from that node. The ids exist
        once the grid has pushed the messages, so the map is built at the first reply.
        """
        if self._sent_to is None:
            self._sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.messages}
            self._sent_to.pop("", None)
        return self._sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    def with_bytes(self, outcome: NodeOutcome) -> NodeOutcome:
        """``outcome`` with what this node was sent."""
        down, dense_down = self.sent_bytes.get(outcome.node_id, (0, 0))
        return replace(outcome, bytes_down=down, dense_down=dense_down)


class LoraFlowerStrategy(Strategy):
    """A Flower strategy that runs ``strategy``'s rounds with ``options``.

    ``required_rank``: every node must train at this rank (central DP), if set.
    """

    def __init__(
        self, strategy: LoraStrategy, options: RoundOptions, *, required_rank: int | None = None
    ) -> None:
        self.strategy = strategy
        self.options = options
        self.nodes = NodeRegistry(
            strategy.lora.rank, strategy.heterogeneous_ranks, required_rank=required_rank
        )
        self.links = NodeLinks(options.uplink, options.downlink)
        self.rng = np.random.default_rng(options.seed)
        self.reports: dict[int, RoundReport] = {}
        self._open: OpenRound | None = None
        spec = options.server_optimizer
        self.optimizer = ServerOptimizer(spec) if spec.kind != "none" else None

    # -- the global adapter ----------------------------------------------------------
    def global_state(self, arrays: ArrayRecord) -> AdapterState:
        """The global ArrayRecord as an adapter (the strategy's rank and scaling)."""
        state = state_from_dict(from_arrayrecord(arrays), 1.0)
        state = AdapterState(state.factors, state.dense, self.strategy.scaling(state.rank))
        return self.strategy.restore_fixed(state)

    def to_record(self, state: AdapterState) -> ArrayRecord:
        """An adapter as the global ArrayRecord."""
        return to_arrayrecord(state.to_state_dict(), flower_numpy=self.options.flower_numpy)

    # -- Flower's hooks -------------------------------------------------------------
    def summary(self) -> None:
        """Log the strategy and the round's settings."""
        s, o = self.strategy, self.options
        logger.log(INFO, "\t├──> Strategy: %s (%s)", s.name or type(s).__name__, s.description)
        logger.log(
            INFO,
            "\t│\t├── LoRA: r=%d alpha=%s targets=%s",
            s.lora.rank,
            s.lora.alpha,
            ",".join(s.lora.target_modules),
        )
        logger.log(
            INFO,
            "\t│\t├── clients per round: %d, min replies: %d",
            o.clients_per_round,
            o.min_replies,
        )
        logger.log(INFO, "\t│\t└── weighting: %s, exact: %s", o.weights.weighting, s.exact)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Discover new nodes, sample the round's, and build one message per node."""
        o = self.options
        started = time.monotonic()
        node_ops.discover_nodes(
            grid,
            self.nodes,
            config,
            count=o.clients_per_round,
            min_replies=o.min_replies,
            timeout=o.node_wait_timeout,
        )
        discovered = time.monotonic()
        current = self.global_state(arrays)
        sampled = node_ops.sample_nodes(
            grid,
            self.nodes,
            self.rng,
            o.clients_per_round,
            min_replies=o.min_replies,
            timeout=o.node_wait_timeout,
        )
        report = RoundReport(server_round, sampled=list(sampled))
        report.metrics["discover-seconds"] = discovered - started
        self.reports[server_round] = report
        for old in [r for r in self.reports if r < server_round - 1]:
            del self.reports[old]  # read once, by the round that made it; 1000 rounds add up
        self._open = open_round = OpenRound(report, current, arrays, started=started)
        for node_id in sampled:
            message = self._message(open_round, server_round, node_id, config)
            if message is not None:
                open_round.messages.append(message)
        if sampled and not open_round.messages:
            first = next(o for o in report.outcomes if o.status == "too-large")
            raise MessageTooLargeError(first.reason)
        logger.log(INFO, "configure_train: round %d, sampled nodes %s", server_round, sampled)
        return open_round.messages

    def _message(
        self, open_round: OpenRound, server_round: int, node_id: int, config: ConfigRecord
    ) -> Message | None:
        """The training message for ``node_id``; None (with the outcome) if it is too large."""
        strategy = self.strategy
        plan = strategy.client_plan(server_round, node_id, self.nodes.rank_of(node_id))
        payload = strategy.payload(server_round, node_id, plan, open_round.current)
        wire, link_config = self.links.send(server_round, node_id, payload)
        record = to_arrayrecord(wire, flower_numpy=self.options.flower_numpy)
        node_config = ConfigRecord(dict(config) | link_config)
        node_config[protocol.SERVER_ROUND] = server_round
        node_config[protocol.PLAN] = plan.to_json()
        nbytes, dense = wire_bytes(record), dense_bytes(np.shape(v) for v in payload.values())
        what = f"training payload for node {node_id} in round {server_round}"
        try:
            check_message_size(nbytes, wire, self.options.max_message_bytes, what)
        except MessageTooLargeError as err:
            logger.log(WARNING, "Node %s left out of round %d: %s", node_id, server_round, err)
            self.links.settle(node_id, replied=False)
            open_round.not_sent.add(node_id)
            open_round.report.outcomes.append(
                NodeOutcome(node_id, "too-large", str(err), dense_down=dense)
            )
            return None
        open_round.plans[node_id] = plan
        open_round.layouts[node_id] = layout(record)
        open_round.sent_bytes[node_id] = (nbytes, dense)
        content = RecordDict({protocol.ARRAYS: record, protocol.CONFIG: node_config})
        return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Read the replies, aggregate the valid ones, check, measure and report."""
        open_round = self._require_open(server_round)
        report, current = open_round.report, open_round.current
        updates: list[ClientUpdate] = []
        seen = set(open_round.screened)
        for msg in replies:
            node_id = open_round.sender(msg)
            seen.add(node_id)
            outcome, update = self._read(open_round, server_round, node_id, msg)
            report.outcomes.append(open_round.with_bytes(outcome))
            if update is not None:
                updates.append(update)
        for node_id in report.sampled:
            if node_id not in seen and node_id not in open_round.not_sent:
                self.links.settle(node_id, replied=False)
                missing = NodeOutcome(node_id, "missing", "no reply before the round timeout")
                report.outcomes.append(open_round.with_bytes(missing))
        declared = self.nodes.examples
        result = aggregate_round(
            self.strategy, server_round, updates, current, report, self.options, declared
        )
        return self._close(open_round, result)

    def train_secure(
        self,
        grid: Grid,
        server_round: int,
        params_for: Callable[[int], SecAggParams],
        timeout: float,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Train the round under SecAgg+ and aggregate the secure weighted mean.

        The weights p_k come from the nodes' declared example counts, bounded as any claim
        (share cap, ratio to the median): a node cannot claim more inside the mask than
        the server told it. Per-node outcomes keep the plaintext metrics (train loss,
        seconds); the update itself is only ever seen summed.
        """
        open_round = self._require_open(server_round)
        report, current = open_round.report, open_round.current
        nodes = sorted(open_round.plans)
        plans = {open_round.plans[n] for n in nodes}
        declared = self.nodes.examples
        claims = [Claim(n, declared.get(n, 0), declared.get(n)) for n in nodes]
        weights, anomalies = client_weights(claims, self.options.weights)
        report.anomalies.extend(anomalies)
        if len(plans) != 1 or weights is None:
            report.skip(
                "secure aggregation needs one plan for every node"
                if len(plans) > 1
                else "no node of the round declared training examples"
            )
            return self._close(open_round, None)
        (plan,) = plans
        secure = secure_round(
            grid,
            server_round,
            open_round.messages,
            params_for,
            dict(zip(nodes, (float(w) for w in weights), strict=True)),
            plan.reply_shapes(current),
            timeout=timeout,
            seed=self.options.seed,
        )
        report.metrics.update(secure.metrics)
        survivors = set(secure.survivors)
        p = dict(zip(nodes, (float(w) for w in weights), strict=True))
        total = sum(p[n] for n in survivors) or 1.0
        losses = []
        for node in nodes:
            self.links.settle(node, replied=node in survivors)
            if node not in survivors:
                reason = secure.failed.get(node, "not in the secure sum")
                if "declined:" in reason:
                    self.nodes.exclude(node, reason)
                report.outcomes.append(open_round.with_bytes(NodeOutcome(node, "dropped", reason)))
                continue
            msg = secure.replies[node]
            record = msg.content.metric_records.get(protocol.METRICS)
            metrics = {k: float(v) for k, v in (record or {}).items() if isinstance(v, int | float)}
            n = int(metrics.get(protocol.NUM_EXAMPLES, 0))
            outcome = NodeOutcome(
                node,
                "ok",
                "",
                n,
                metrics=metrics,
                bytes_up=reply_bytes(msg),
                dense_up=dense_bytes(plan.reply_shapes(current).values()),
                weight=p[node] / total,
            )
            report.outcomes.append(open_round.with_bytes(outcome))
            if protocol.TRAIN_LOSS in metrics:
                losses.append((p[node] / total, metrics[protocol.TRAIN_LOSS]))
        if secure.mean is None:
            report.skip(secure.skip_reason)
            logger.log(WARNING, "Round %d skipped: %s", server_round, report.skip_reason)
            return self._close(open_round, None)
        if len(survivors) < self.options.min_replies:
            report.skip(
                f"{len(survivors)} masked updates, fewer than "
                f"min-replies={self.options.min_replies}"
            )
            return self._close(open_round, None)
        if losses and len(losses) == len(survivors):
            report.metrics[protocol.TRAIN_LOSS] = sum(w * v for w, v in losses)
        examples = sum(o.num_examples for o in report.outcomes if o.status == "ok")
        result = aggregate_secure_sum(
            self.strategy, server_round, secure.mean, plan, examples, current, report
        )
        return self._close(open_round, result)

    def _close(
        self, open_round: OpenRound, result: AdapterState | None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The server optimiser's step on ``result``, the round's time, its metrics."""
        report, current = open_round.report, open_round.current
        if result is not None and self.optimizer is not None:
            stepped = self.optimizer.step(current, result)
            stepped.check_finite()
            report.metrics["aggregate-step-norm"] = step_norm(current, result)
            report.metrics["server-step-norm"] = step_norm(current, stepped)
            result = stepped
        report.seconds = time.monotonic() - open_round.started
        metrics = MetricRecord(round_metrics(report))
        return (None if result is None else self.to_record(result)), metrics

    def _read(
        self, open_round: OpenRound, server_round: int, node_id: int, msg: Message
    ) -> tuple[NodeOutcome, ClientUpdate | None]:
        if msg.has_error():  # the node may not hold the payload: the next one goes dense
            self.links.settle(node_id, replied=False)
            return NodeOutcome(node_id, "error", error_reason(msg)), None
        plan = open_round.plans.get(node_id)
        outcome, update = read_reply(
            self.strategy, self.links, server_round, node_id, plan, msg, open_round.current
        )
        # after decoding: the uplink is decoded against what this node received, which
        # settling forgets. A node whose reply is rejected still holds this payload.
        self.links.settle(node_id, replied=True)
        if outcome.status == "declined":
            self.nodes.exclude(node_id, outcome.reason)
        elif outcome.status == "dropped":
            logger.log(
                WARNING,
                "Round %d: reply from node %s dropped: %s",
                server_round,
                node_id,
                outcome.reason,
            )
        dense_up = 0
        if update is not None:
            dense_up = dense_bytes(update.plan.reply_shapes(open_round.current).values())
        return replace(outcome, bytes_up=reply_bytes(msg), dense_up=dense_up), update

    def screen_replies(
        self, server_round: int, replies: Iterable[Message], *, whole: bool = False
    ) -> list[Message]:
        """Set aside the replies that Flower's central-DP wrapper around this must not see.

        They are recorded as outcomes here, and :meth:`aggregate_train` takes the rest.
        """
        open_round = self._require_open(server_round)
        kept = []
        for msg in replies:
            node_id = open_round.sender(msg)
            try:
                status, reason = screen_for_wrapper(
                    msg,
                    open_round.plans.get(node_id),
                    open_round.layouts.get(node_id, []),
                    open_round.global_record,
                    rank=self.strategy.lora.rank,
                    whole=whole,
                )
            except Exception as err:  # nothing one reply holds may end the round
                status, reason = "dropped", f"unreadable reply ({type(err).__name__}: {err})"
            if not reason:
                kept.append(msg)
                continue
            logger.log(
                WARNING,
                "Round %d: reply from node %s set aside: %s",
                server_round,
                node_id,
                reason,
            )
            open_round.screened.add(node_id)
            self.links.settle(node_id, replied=status == "dropped")
            up = 0 if msg.has_error() else reply_bytes(msg)
            outcome = NodeOutcome(node_id, status, reason, bytes_up=up)
            open_round.report.outcomes.append(open_round.with_bytes(outcome))
        return kept

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask a fraction of the nodes to evaluate the global adapter on their own data."""
        o = self.options
        if o.fraction_evaluate <= 0.0:
            return []
        available = [n for n in grid.get_node_ids() if n not in self.nodes.excluded]
        count = max(1, round(len(available) * o.fraction_evaluate))
        chosen = node_ops.sample_nodes(
            grid,
            self.nodes,
            self.rng,
            count,
            min_replies=o.min_replies,
            timeout=o.node_wait_timeout,
        )
        current = self.global_state(arrays)
        return evaluation_messages(
            server_round,
            current,
            config,
            chosen,
            lambda node: self.strategy.evaluation_plan(server_round, node, current.rank),
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the nodes' evaluation metrics (bad replies ignored)."""
        return mean_evaluation(replies, self.options.weights)

    # -- checkpointing --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The server's round state (sampling RNG, nodes, links) and the strategy's own."""
        return {
            "rng": self.rng.bit_generator.state,
            "nodes": self.nodes.state_dict(),
            "links": self.links.state_dict(),
            "strategy": self.strategy.state_dict(),
            "server_optimizer": self.optimizer.state_dict() if self.optimizer else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
        self.nodes.load_state_dict(state.get("nodes", {}))
        self.links.load_state_dict(state.get("links", {}))
        self.strategy.load_state_dict(state.get("strategy", {}))
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state.get("server_optimizer", {}))

    def _require_open(self, server_round: int) -> OpenRound:
        if self._open is None or self._open.report.server_round != server_round:
            raise RuntimeError(f"round {server_round} was not configured by configure_train")
        return self._open
