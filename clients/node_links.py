"""The node's end of the compressed links: rebuilding the payload, encoding the reply.

The server's end is :class:`fedlora.server.link_state.NodeLinks`; both call the same functions
of :mod:`fedlora.wire.links`, so they agree bit for bit on what the node trains from and
what it sent.
"""

from __future__ import annotations

import numpy as np

from fedlora.clients.node_state import NodeStore
from fedlora.lora.base_merge import without_stacks
from fedlora.lora.plan import ClientPlan, is_factor
from fedlora.wire import protocol
from fedlora.wire.codec import Codec, CompressionError
from fedlora.wire.links import apply_downlink, encode_uplink


def encode_reply(
    store: NodeStore,
    trained: dict[str, np.ndarray],
    received: dict[str, np.ndarray],
    plan: ClientPlan,
    codec: Codec,
    server_round: int,
) -> dict[str, np.ndarray]:
    """A node's reply: the trained tensors, or encoded deltas with error feedback.

    With DP this runs after clipping and noising, so it is post-processing and keeps the
    guarantee. The residual of re-initialised factors (FLoRA's fresh adapters) is
    dropped: the next round trains new factors, which it has nothing to add to.
    """
    if codec.identity:
        return trained
    reference = plan.reference({k: v.shape for k, v in trained.items()}, received)
    residual, _ = store.load(protocol.UPLINK_RESIDUAL)
    if plan.reinit:
        residual = {k: v for k, v in residual.items() if not is_factor(k)}
    wire, residual = encode_uplink(trained, reference, residual, codec)
    store.save(protocol.UPLINK_RESIDUAL, residual, {"round": server_round})
    return wire


def receive_downlink(
    store: NodeStore, wire: dict[str, np.ndarray], base_round: int, server_round: int
) -> dict[str, np.ndarray]:
    """The payload the server meant, rebuilt from its deltas and what this node holds.

    Raises when the server encoded against a payload this node does not hold (its state
    was lost): the error reply makes the server send the next payload dense.
    """
    held, meta = store.load(protocol.DOWNLINK_HELD)
    if base_round >= 0 and int(meta.get("round", -1)) != base_round:
        raise CompressionError(
            f"{protocol.DOWNLINK_BASE}={base_round}, but this node holds the payload of round "
            f"{meta.get('round', 'none')}"
        )
    received = apply_downlink(wire, held if base_round >= 0 else None)
    store.save(protocol.DOWNLINK_HELD, without_stacks(received), {"round": server_round})
    return received
