"""The two directions of a compressed link: what each end sends and rebuilds.

Built on the codec of :mod:`fedlora.wire.codec`. The downlink sends deltas from what a
node already holds; the uplink sends deltas from the tensors a node started training
from, which the server can rebuild (received, re-initialised to zero, or seeded).
Server and node call the same functions, so they agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.wire.codec import Codec, CompressionError, decode, encode, is_encoded, with_feedback


def encode_downlink(
    payload: Mapping[str, np.ndarray], held: Mapping[str, np.ndarray] | None, codec: Codec
) -> dict[str, np.ndarray]:
    """What the server sends a node that holds ``held`` (its last reconstructed payload).

    A tensor the node already holds, at the same shape, goes as an encoded delta from
    it; the rest (new keys, FLoRA stacks) goes dense. The delta is taken from what the
    node holds, not from the last global, so whatever an earlier round did not deliver
    is in this round's delta: error feedback on the downlink without a server residual.
    ``held`` must not have keys ``payload`` lacks (the node reads every held key not sent
    dense as encoded): :class:`fedlora.server.link_state.NodeLinks` sends such a payload
    against nothing.
    """
    held = {} if codec.identity or held is None else held
    deltas = {
        k: np.asarray(v, dtype=np.float32) - held[k]
        for k, v in payload.items()
        if k in held and held[k].shape == np.shape(v)
    }
    out = encode(deltas, codec) if deltas else {}
    out.update({k: np.asarray(v) for k, v in payload.items() if k not in deltas})
    return out


def apply_downlink(
    wire: Mapping[str, np.ndarray], held: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """The payload a node reconstructs from ``wire`` and what it held.

    The encoded tensors are the held ones not sent dense (``#names`` confirms it).
    Server and node both call this, so they agree bit for bit on what the node trains
    from.
    """
    held = held or {}
    dense = {k: np.shape(v) for k, v in wire.items() if not k.startswith("#")}
    shapes = dict(dense)
    if is_encoded(wire):
        shapes.update({k: v.shape for k, v in held.items() if k not in dense})
    decoded = decode(wire, shapes)
    return {
        k: (v if k in dense else held[k] + v).astype(np.float32, copy=False)
        for k, v in decoded.items()
    }


def encode_uplink(
    trained: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray],
    codec: Codec,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A node's reply: encoded deltas from ``reference`` (with error feedback), the rest dense.

    Returns the wire form and the new residual.
    """
    deltas = {
        k: np.asarray(v, dtype=np.float32) - reference[k]
        for k, v in trained.items()
        if k in reference
    }
    wire, new_residual = with_feedback(deltas, residual, codec)
    wire.update({k: np.asarray(v) for k, v in trained.items() if k not in reference})
    return wire, new_residual


def decode_uplink(
    wire: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    reference: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The dense tensors a node trained, from its encoded reply and the shared reference."""
    dense_sent = sorted(k for k in reference if k in wire)
    if dense_sent:
        raise CompressionError(f"tensor(s) {dense_sent[:3]} must be encoded deltas, came dense")
    decoded = decode(wire, shapes)
    return {k: (reference[k] + v if k in reference else v) for k, v in decoded.items()}
