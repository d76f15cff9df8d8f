"""A node's side of SecAgg+: the stages around training, and the masking of its reply.

The protocol itself is :mod:`fedlora.secagg.protocol`; here it meets Flower's messages.
Its state (fresh key pairs, the neighbours' shares) lives in the node's Flower context
between the messages of one round, never on disk, and a new round's setup replaces it.
"""

from __future__ import annotations

import json
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore import log

from fedlora.secagg.protocol import NodeSecAgg, SecAggError, SecAggParams, flatten
from fedlora.wire import protocol

STATE = "secagg-state"
"""Context record of the node's protocol state (one JSON text)."""


def _load(context: Context) -> NodeSecAgg:
    record = context.state.config_records.get(STATE)
    if record is None:
        raise SecAggError("a secure-aggregation stage arrived before this node's setup")
    return NodeSecAgg(**json.loads(str(record["json"])))


def _save(context: Context, state: NodeSecAgg) -> None:
    context.state.config_records[STATE] = ConfigRecord({"json": json.dumps(state.__dict__)})


def handle_stage(msg: Message, context: Context) -> Message:
    """The setup, share-keys and unmask stages (``query.secagg`` messages)."""
    config = msg.content.config_records[protocol.CONFIG]
    stage = str(config[protocol.SECAGG_STAGE])
    server_round = int(config[protocol.SERVER_ROUND])
    node_id = msg.metadata.dst_node_id
    reply = ConfigRecord()
    if stage == "setup":
        params = SecAggParams(**json.loads(str(config[protocol.SECAGG_PARAMS])))
        state, pk1, pk2 = NodeSecAgg.setup(node_id, server_round, params)
        reply[protocol.SECAGG_PK1], reply[protocol.SECAGG_PK2] = pk1, pk2
    elif stage == "share-keys":
        state = _load(context)
        ids = [int(n) for n in config[protocol.SECAGG_NODES]]  # type: ignore[union-attr]
        keys = dict(
            zip(
                ids,
                zip(config[protocol.SECAGG_PK1], config[protocol.SECAGG_PK2], strict=True),  # type: ignore[arg-type]
                strict=True,
            )
        )
        out = state.share_keys(server_round, keys)
        reply[protocol.SECAGG_NODES] = list(out)
        reply[protocol.SECAGG_CIPHERTEXTS] = list(out.values())
    elif stage == "unmask":
        state = _load(context)
        survivors = [int(n) for n in config[protocol.SECAGG_SURVIVORS]]  # type: ignore[union-attr]
        dropped = [int(n) for n in config[protocol.SECAGG_DROPPED]]  # type: ignore[union-attr]
        shares = state.reveal(server_round, survivors, dropped)
        reply[protocol.SECAGG_NODES] = list(shares)
        reply[protocol.SECAGG_SHARES] = list(shares.values())
    else:
        raise SecAggError(f"unknown secure-aggregation stage {stage!r}")
    _save(context, state)
    return Message(RecordDict({protocol.CONFIG: reply}), reply_to=msg)


def asked_to_mask(msg: Message) -> bool:
    """Whether a training message asks for a masked reply."""
    config = msg.content.config_records.get(protocol.CONFIG)
    return config is not None and protocol.SECAGG_WEIGHT in config


def mask_reply(msg: Message, context: Context, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The reply's tensors, weighted by p_k, quantised and masked.

    How many values were clipped to the range is logged here, on the node, not sent: a
    count per node would tell the server something about that node's update.
    """
    config = msg.content.config_records[protocol.CONFIG]
    state = _load(context)
    srcs = [int(n) for n in config[protocol.SECAGG_NODES]]  # type: ignore[union-attr]
    ciphertexts = dict(zip(srcs, config[protocol.SECAGG_CIPHERTEXTS], strict=True))  # type: ignore[arg-type]
    weight = float(config[protocol.SECAGG_WEIGHT])  # type: ignore[arg-type]
    if not 0.0 < weight <= 1.0:
        raise SecAggError(f"secure-aggregation weight {weight} is not in (0, 1]")
    masked, clipped = state.mask(
        int(config[protocol.SERVER_ROUND]),
        ciphertexts,
        flatten(tensors, weight),  # type: ignore[arg-type]
    )
    _save(context, state)
    if clipped:
        log(
            WARNING,
            "Node %s: %d values of its weighted update were clipped to +-%g "
            "(secagg-clipping-range)",
            state.node_id,
            clipped,
            state.settings.clipping_range,
        )
    return masked
