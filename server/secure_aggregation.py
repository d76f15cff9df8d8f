"""SecAgg+ on Flower's Message API: the four stages of a round, over the Grid.

:func:`secure_round` takes the round's training messages (plans and payloads built as
for any round) and runs, as Flower's legacy ``SecAggPlusWorkflow`` does:

1. setup: each node makes two key pairs and sends the public keys;
2. share keys: each node gets its neighbours' public keys and sends its secrets' shares,
   encrypted for each neighbour;
3. collect masked: the training message, plus the shares addressed to the node and its
   weight p_k; the node trains and replies with its masked, weighted, quantised update;
4. unmask: each survivor reveals the shares the server needs to remove the masks.

The server ends with the weighted sum of the survivors' updates and the sum of their
weights, never one node's update; a node lost after step 3 is unmasked from the others'
shares, and with fewer than the threshold left the round is skipped with the reason. The
cryptography is in :mod:`fedlora.secagg.protocol`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.lora.state import AdapterError
from fedlora.secagg.protocol import (
    SecAggError,
    SecAggParams,
    masked_sum,
    neighbourhoods,
    unflatten,
    unmask,
    vector_size,
)
from fedlora.server.messaging import send_and_collect
from fedlora.server.peer import error_reason
from fedlora.strategies.api import logger
from fedlora.wire import protocol
from fedlora.wire.records import from_arrayrecord

STAGE_TYPE = f"{MessageType.QUERY}.{protocol.SECAGG_ACTION}"


@dataclass
class SecureResult:
    """What one secure round gives the server: the sum, who took part, and the costs."""

    replies: dict[int, Message] = field(default_factory=dict)  # masked-stage replies
    failed: dict[int, str] = field(default_factory=dict)  # node -> why it is not in the sum
    survivors: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)  # shared keys, sent no masked input
    mean: dict[str, np.ndarray] | None = None  # sum_k p_k x_k / sum_k p_k
    weight: float = 0.0  # sum_k p_k over the survivors (as unmasked)
    skip_reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # bytes and seconds per stage


def config_bytes(record: ConfigRecord) -> int:
    """Payload bytes of a config record's values (bytes and text by length, numbers as 8)."""
    total = 0
    for value in record.values():
        items = value if isinstance(value, list) else [value]
        total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in items)
    return total


def _stage_message(node_id: int, server_round: int, stage: str, **values: Any) -> Message:
    config = ConfigRecord(
        {protocol.SECAGG_STAGE: stage, protocol.SERVER_ROUND: server_round, **values}
    )
    return Message(
        RecordDict({protocol.CONFIG: config}), dst_node_id=node_id, message_type=STAGE_TYPE
    )


class _Stages:
    """The exchange with the nodes, stage by stage, with its bookkeeping."""

    def __init__(self, grid: Grid, timeout: float, result: SecureResult) -> None:
        self.grid, self.timeout, self.result = grid, timeout, result

    def exchange(self, stage: str, messages: Sequence[Message]) -> dict[int, ConfigRecord]:
        """Send one stage's messages; the readable replies' config records by node."""
        started = time.perf_counter()
        sent_to = {}
        down = 0
        for m in messages:
            sent_to[m.metadata.dst_node_id] = m
            down += config_bytes(m.content.config_records[protocol.CONFIG])
        replies = send_and_collect(self.grid, messages, self.timeout)
        got: dict[int, ConfigRecord] = {}
        up = 0
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in sent_to:
                continue
            if msg.has_error():
                self.result.failed[node] = f"{stage}: {error_reason(msg)}"
                continue
            if stage == "collect-masked":  # a training reply: arrays and metrics
                self.result.replies[node] = msg
                got[node] = ConfigRecord()
                continue
            config = msg.content.config_records.get(protocol.CONFIG)
            if config is None:
                self.result.failed[node] = f"{stage}: reply without its config record"
                continue
            got[node] = config
            up += config_bytes(config)
        for node in sent_to:
            if node not in got and node not in self.result.failed:
                self.result.failed[node] = f"{stage}: no reply before the timeout"
        m = self.result.metrics
        m[f"secagg-seconds-{stage}"] = time.perf_counter() - started
        m[f"secagg-bytes-down-{stage}"] = float(down)
        m[f"secagg-bytes-up-{stage}"] = float(up)
        return got


def secure_round(
    grid: Grid,
    server_round: int,
    messages: Sequence[Message],
    params_for: Callable[[int], SecAggParams],
    weights: Mapping[int, float],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    timeout: float,
    seed: int,
) -> SecureResult:
    """Run SecAgg+ around ``messages`` (one training message per node); never raises.

    ``params_for``: the settings for a round of that many nodes (nodes without weight
    are not asked). ``weights``: each node's p_k (from its declared example count,
    bounded as any claim).
    ``shapes``: the layout of every node's reply (the same plan for all).
    """
    result = SecureResult()
    stages = _Stages(grid, timeout, result)
    train = {m.metadata.dst_node_id: m for m in messages}
    for n in [n for n in train if not weights.get(n, 0.0) > 0]:  # nothing to add: not asked
        result.failed[n] = "declared no training examples (weight 0)"
        del train[n]
    nodes = sorted(train)
    params = params_for(len(nodes))
    try:
        params.check(len(nodes))
    except SecAggError as err:
        result.skip_reason = f"secure aggregation: {err}"
        return result
    hoods = neighbourhoods(nodes, params.num_shares, seed=seed * 1_000_003 + server_round)
    text = json.dumps(params.to_dict())

    # 1. setup: public keys
    replies = stages.exchange(
        "setup",
        [_stage_message(n, server_round, "setup", **{protocol.SECAGG_PARAMS: text}) for n in nodes],
    )
    keys: dict[int, tuple[bytes, bytes]] = {}
    for node, config in replies.items():
        pk1, pk2 = config.get(protocol.SECAGG_PK1), config.get(protocol.SECAGG_PK2)
        if isinstance(pk1, bytes) and isinstance(pk2, bytes) and 0 < len(pk1 + pk2) <= 4096:
            keys[node] = (pk1, pk2)
        else:
            result.failed[node] = "setup: public keys missing or malformed"
    seen: dict[bytes, int] = {}
    for node, pair in list(keys.items()):  # a copied key would make its neighbours refuse
        for key in pair:
            if key in seen and seen[key] != node:
                for culprit in (node, seen[key]):
                    keys.pop(culprit, None)
                    result.failed[culprit] = "setup: a public key another node also sent"
            seen[key] = node
    if not _enough(result, "setup", keys, params):
        return result

    # 2. share keys: each node's neighbours' public keys, its encrypted shares back
    def share_message(n: int) -> Message:
        near = sorted(hoods[n] & set(keys))
        return _stage_message(
            n,
            server_round,
            "share-keys",
            **{
                protocol.SECAGG_NODES: near,
                protocol.SECAGG_PK1: [keys[j][0] for j in near],
                protocol.SECAGG_PK2: [keys[j][1] for j in near],
            },
        )

    replies = stages.exchange("share-keys", [share_message(n) for n in sorted(keys)])
    inbox: dict[int, dict[int, bytes]] = {n: {} for n in replies}
    for src, config in replies.items():
        dsts = config.get(protocol.SECAGG_NODES, [])
        texts = config.get(protocol.SECAGG_CIPHERTEXTS, [])
        # exactly one share for each neighbour it was given, else the masks do not cancel
        expected = sorted((hoods[src] & set(keys)) - {src})
        if (
            not isinstance(dsts, list)
            or not isinstance(texts, list)
            or sorted(dsts) != expected  # type: ignore[type-var]
            or len(texts) != len(dsts)
            or not all(isinstance(c, bytes) for c in texts)
        ):
            result.failed[src] = "share-keys: not one share for each of its neighbours"
            continue
        for dst, ciphertext in zip(dsts, texts, strict=True):
            inbox.setdefault(int(dst), {})[src] = ciphertext  # type: ignore[arg-type]
    shared = sorted(n for n in replies if n not in result.failed)
    if not _enough(result, "share-keys", shared, params):
        return result

    # 3. collect masked: train, weight, mask; the shares addressed to each node ride along
    total_weight = sum(weights[n] for n in shared)  # > 0: every node here has a weight
    outgoing = []
    for n in shared:
        msg = train[n]
        config = msg.content.config_records[protocol.CONFIG]
        srcs = sorted(s for s in inbox.get(n, {}) if s in shared)
        config[protocol.SECAGG_NODES] = srcs
        config[protocol.SECAGG_CIPHERTEXTS] = [inbox[n][s] for s in srcs]
        config[protocol.SECAGG_WEIGHT] = float(weights.get(n, 0.0) / total_weight)
        outgoing.append(msg)
    replies = stages.exchange("collect-masked", outgoing)
    size = vector_size(shapes)
    vectors: dict[int, np.ndarray] = {}
    for node in replies:
        try:
            vectors[node] = _masked_vector(result.replies[node], size, params.modulus)
        except (AdapterError, SecAggError, KeyError) as err:
            result.failed[node] = f"collect-masked: {err}"
            result.replies.pop(node, None)
    result.metrics["secagg-bytes-up-collect-masked"] = float(4 * size * len(vectors))
    survivors = sorted(vectors)
    result.survivors, result.dropped = survivors, sorted(set(shared) - set(survivors))
    if not _enough(result, "collect-masked", survivors, params):
        return result

    # 4. unmask: the survivors reveal the shares of b (survivors) or of sk1 (dropped)
    dropped = set(result.dropped)
    replies = stages.exchange(
        "unmask",
        [
            _stage_message(
                n,
                server_round,
                "unmask",
                **{
                    protocol.SECAGG_SURVIVORS: sorted(hoods[n] & set(survivors)),
                    protocol.SECAGG_DROPPED: sorted(hoods[n] & dropped),
                },
            )
            for n in survivors
        ],
    )
    shares: dict[int, list[bytes]] = {n: [] for n in shared}
    for node, config in replies.items():
        owners = config.get(protocol.SECAGG_NODES, [])
        values = config.get(protocol.SECAGG_SHARES, [])
        if not (isinstance(owners, list) and isinstance(values, list)):
            continue
        asked = hoods[node] & (set(survivors) | dropped)
        taken: set[int] = set()
        for owner, share in zip(owners, values, strict=False):
            # one share per owner it was asked about: a revealer cannot stuff the pool
            if owner in asked and owner not in taken and isinstance(share, bytes):
                shares[owner].append(share)  # type: ignore[index]
                taken.add(owner)  # type: ignore[arg-type]
    started = time.perf_counter()
    try:
        summed, weight = unmask(
            masked_sum([vectors[n] for n in survivors], params.modulus),
            params,
            survivors=survivors,
            dropped=result.dropped,
            shares=shares,
            neighbours=hoods,
            public_keys=keys,
        )
    except (SecAggError, ValueError) as err:
        result.skip_reason = f"secure aggregation: unmasking failed: {err}"
        return result
    result.metrics["secagg-seconds-server-unmask"] = time.perf_counter() - started
    known = sum(weights[n] for n in survivors) / total_weight  # what the server sent out
    if abs(weight - known) > 2 * len(survivors) * params.step:
        # a wrong share, or masks that did not cancel: the sum is garbage, not an update
        result.skip_reason = (
            f"secure aggregation: the unmasked weights sum to {weight:.6g}, the survivors' "
            f"are {known:.6g}: a node sent inconsistent shares or masks"
        )
        logger.log(WARNING, "Round %d skipped: %s", server_round, result.skip_reason)
        return result
    result.mean, result.weight = unflatten(summed / weight, shapes), weight
    result.metrics |= {
        "secagg-survivors": float(len(survivors)),
        "secagg-dropped": float(len(result.dropped)),
        "secagg-weight-sum": weight,
        "secagg-max-quantization-error": len(survivors) * params.step / weight,
    }
    logger.log(
        INFO,
        "Round %d: SecAgg+ summed %d masked updates (%d dropped after sharing keys)",
        server_round,
        len(survivors),
        len(result.dropped),
    )
    return result


def _masked_vector(msg: Message, size: int, modulus: int) -> np.ndarray:
    """A node's masked vector from its reply, checked: uint32, the expected length, < M."""
    metrics = msg.content.metric_records.get(protocol.METRICS)
    if metrics is not None and metrics.get(protocol.DECLINED):
        config = msg.content.config_records.get(protocol.CONFIG)
        raise SecAggError(f"declined: {config.get(protocol.REASON) if config else ''}")
    arrays = msg.content.array_records.get(protocol.ARRAYS)
    if arrays is None:
        raise SecAggError("reply without its masked vector")
    tensors = from_arrayrecord(arrays)
    if set(tensors) != {protocol.SECAGG_MASKED}:
        raise SecAggError(f"reply carries {sorted(tensors)[:3]}, not only the masked vector")
    vector = tensors[protocol.SECAGG_MASKED]
    if vector.dtype != np.uint32 or vector.shape != (size,):
        raise SecAggError(
            f"masked vector of {vector.dtype} {vector.shape}, expected uint32 ({size},)"
        )
    if int(vector.max(initial=0)) >= modulus:
        raise SecAggError(f"masked vector holds values >= the modulus {modulus}")
    return vector.astype(np.int64)


def _enough(result: SecureResult, stage: str, nodes: Any, params: SecAggParams) -> bool:
    """Whether enough nodes are left after ``stage``; if not, the round's skip reason."""
    if len(nodes) >= params.threshold:
        return True
    result.skip_reason = (
        f"secure aggregation: {len(nodes)} nodes left after the {stage} stage, fewer than "
        f"secagg-threshold={params.threshold}"
    )
    logger.log(WARNING, "Round skipped: %s", result.skip_reason)
    return False
