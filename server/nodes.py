"""The nodes of a federation as the server knows them: discovery, exclusion, waiting, sampling.

:class:`NodeRegistry` holds what nodes said about themselves (rank, partition, the
examples they declared) and which are excluded, with why; the functions below ask new
nodes to describe themselves, wait for enough of them, and sample a round's nodes with
the run's seeded generator. Replies come from peers: every number in them is checked.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.server.messaging import send_and_collect
from fedlora.server.peer import error_reason, whole_number
from fedlora.strategies.api import logger
from fedlora.wire import protocol


@dataclass
class NodeRegistry:
    """What the server knows about each node, kept across rounds (and checkpoints).

    ``rank``: the run's lora-rank, the most a node may train at. ``mixed_ranks``: whether
    a node may train at a lower rank (the strategy supports heterogeneous ranks).
    ``required_rank``: the one rank every node must train at (central DP), if any.
    """

    rank: int
    mixed_ranks: bool = True
    required_rank: int | None = None
    ranks: dict[int, int] = field(default_factory=dict)
    partitions: dict[int, int] = field(default_factory=dict)
    examples: dict[int, int] = field(default_factory=dict)
    excluded: dict[int, str] = field(default_factory=dict)
    asked: dict[int, int] = field(default_factory=dict)  # queries sent to a silent node
    waited: bool = False  # the first wait for a full sample is over

    def rank_of(self, node_id: int) -> int:
        """The rank ``node_id`` trains at: its declared rank, else the run's."""
        return self.ranks.get(node_id, self.rank)

    def exclude(self, node_id: int, reason: str) -> None:
        """Stop sampling ``node_id`` (its privacy budget is spent, its settings are wrong)."""
        if node_id not in self.excluded:
            logger.log(WARNING, "Node %s excluded from sampling: %s", node_id, reason)
        self.excluded[node_id] = reason

    def register(self, node_id: int, rank: int) -> None:
        """Record a node's declared rank, or exclude it if the run cannot use that rank."""
        if rank <= 0 or rank > self.rank:
            self.exclude(node_id, f"declared rank {rank} is outside [1, lora-rank={self.rank}]")
        elif rank != self.rank and not self.mixed_ranks:
            self.exclude(
                node_id,
                f"declared rank {rank} differs from lora-rank={self.rank} and the strategy "
                "does not support heterogeneous ranks",
            )
        elif self.required_rank is not None and rank != self.required_rank:
            self.exclude(
                node_id, f"declared rank {rank}; central DP needs lora-rank={self.required_rank}"
            )
        else:
            self.ranks[node_id] = rank

    def state_dict(self) -> dict[str, Any]:
        """For a checkpoint (a resumed run does not ask its nodes again)."""
        return {
            "node_ranks": {str(k): v for k, v in self.ranks.items()},
            "node_partitions": {str(k): v for k, v in self.partitions.items()},
            "node_examples": {str(k): v for k, v in self.examples.items()},
            "excluded_nodes": dict(self.excluded.items()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.ranks = {int(k): int(v) for k, v in state.get("node_ranks", {}).items()}
        self.partitions = {int(k): int(v) for k, v in state.get("node_partitions", {}).items()}
        self.examples = {int(k): int(v) for k, v in state.get("node_examples", {}).items()}
        self.excluded = {int(k): str(v) for k, v in state.get("excluded_nodes", {}).items()}


QUERY_ATTEMPTS = 3
"""How many rounds a node that does not answer the query is asked again."""


def wait_for_nodes(grid: Grid, registry: NodeRegistry, count: int, timeout: float) -> list[int]:
    """Connected, non-excluded nodes, after waiting up to ``timeout`` s for ``count`` of them.

    Excluded nodes count as connected (waiting would not bring them back).
    """
    deadline = time.monotonic() + timeout
    while True:
        connected = sorted(grid.get_node_ids())
        if len(connected) >= count or time.monotonic() >= deadline:
            return [n for n in connected if n not in registry.excluded]
        logger.log(INFO, "Waiting for nodes: %d connected, %d wanted", len(connected), count)
        time.sleep(1.0)


def nodes_to_wait_for(registry: NodeRegistry, count: int, min_replies: int) -> int:
    """``count`` the first time, then only ``min_replies``.

    The first round waits (up to the timeout) for a full sample; after that a node that
    is gone does not come back, and waiting for it would cost every round the whole
    timeout, so a round goes on as soon as enough nodes are there to aggregate.
    """
    return count if not registry.waited else min(count, min_replies)


def sample_nodes(
    grid: Grid,
    registry: NodeRegistry,
    rng: np.random.Generator,
    count: int,
    *,
    min_replies: int,
    timeout: float,
) -> list[int]:
    """``count`` connected nodes drawn with the run's seeded generator (fewer if absent).

    Flower draws node ids at random; ordering by the partition a node reported makes the
    same seed sample the same data in every launch of a simulation.
    """
    wanted = nodes_to_wait_for(registry, count, min_replies)
    connected = wait_for_nodes(grid, registry, wanted, timeout)
    registry.waited = True
    nodes = sorted(connected, key=lambda n: (registry.partitions.get(n, 2**62), n))
    if not nodes:
        return []
    chosen = rng.choice(len(nodes), size=min(count, len(nodes)), replace=False)
    return [nodes[i] for i in sorted(chosen)]


def discover_nodes(
    grid: Grid,
    registry: NodeRegistry,
    config: ConfigRecord,
    *,
    count: int,
    min_replies: int,
    timeout: float,
) -> None:
    """Ask connected nodes not seen before to describe themselves (rank, partition, examples).

    One QUERY message per new node; a node that does not answer is asked again in later
    rounds, at most :data:`QUERY_ATTEMPTS` times, and meanwhile trains at the run's rank.
    A node whose description is not whole numbers, or whose settings fail its own checks,
    is excluded with the reason.
    """
    wait_for_nodes(grid, registry, nodes_to_wait_for(registry, count, min_replies), timeout)
    registry.waited = True
    seen = set(registry.ranks) | set(registry.excluded)
    new = sorted(
        n
        for n in grid.get_node_ids()
        if n not in seen and registry.asked.get(n, 0) < QUERY_ATTEMPTS
    )
    if not new:
        return
    for n in new:
        registry.asked[n] = registry.asked.get(n, 0) + 1
    messages = [
        Message(
            RecordDict({protocol.CONFIG: ConfigRecord(dict(config))}),
            dst_node_id=n,
            message_type=MessageType.QUERY,
        )
        for n in new
    ]
    for msg in send_and_collect(grid, messages, timeout):
        try:
            describe(registry, msg)
        except Exception as err:  # nothing one answer holds may end the round
            registry.exclude(
                msg.metadata.src_node_id, f"unreadable description ({type(err).__name__}: {err})"
            )
    logger.log(INFO, "Node ranks: %s", dict(sorted(registry.ranks.items())))


def describe(registry: NodeRegistry, msg: Message) -> None:
    """Take one node's answer to the QUERY into the registry."""
    node_id = msg.metadata.src_node_id
    if msg.has_error() or protocol.METRICS not in msg.content.metric_records:
        reason = error_reason(msg) if msg.has_error() else "no metrics in reply"
        if "ConfigError" in reason:  # its settings are wrong: retrying cannot help
            registry.exclude(node_id, f"invalid configuration: {reason}")
        else:
            logger.log(WARNING, "Node %s did not describe itself: %s", node_id, reason)
        return
    info = msg.content.metric_records[protocol.METRICS]
    rank = whole_number(info, protocol.NODE_RANK, registry.rank)
    partition = whole_number(info, protocol.NODE_PARTITION, -1)
    examples = whole_number(info, protocol.NUM_EXAMPLES, 0)
    if rank is None or partition is None or examples is None:
        registry.exclude(node_id, f"its description is not whole numbers: {dict(info)}")
        return
    if partition >= 0:
        registry.partitions[node_id] = partition
    if examples > 0:
        registry.examples[node_id] = examples
    registry.register(node_id, rank)
