"""The client's central-DP mod: Flower's fixedclipping_mod, whose errors reach the server."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedlora.clients.app import central_clipping_mod
from fedlora.wire import protocol


def _instruction() -> Message:
    arrays = ArrayRecord({k: Array(np.zeros(3, np.float32)) for k in ("m.lora_A", "m.lora_B")})
    content = RecordDict(
        {protocol.ARRAYS: arrays, protocol.CONFIG: ConfigRecord({KEY_CLIPPING_NORM: 1.0})}
    )
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "instruction-1"  # as the SuperLink assigns one
    return msg


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _replying_with(keys: tuple[str, ...]):
    def train(msg: Message, _context: Context) -> Message:
        arrays = ArrayRecord({k: Array(np.ones(3, np.float32)) for k in keys})
        return Message(RecordDict({protocol.ARRAYS: arrays}), reply_to=msg)

    return train


def test_a_reply_that_fails_flowers_key_check_is_an_error_reply_to_the_instruction():
    """A reply without one of the tensors it was sent (RoLoRA's frozen factor) is refused
    by fixedclipping_mod; the server must receive that refusal, not wait for a timeout."""
    msg = _instruction()
    out = central_clipping_mod(msg, _context(), _replying_with(("m.lora_B",)))
    assert out.has_error()
    assert out.metadata.reply_to_message_id == "instruction-1"
    assert "keys" in out.error.reason


def test_a_matching_reply_is_clipped_and_answers_the_instruction():
    msg = _instruction()
    out = central_clipping_mod(msg, _context(), _replying_with(("m.lora_A", "m.lora_B")))
    assert not out.has_error()
    assert out.metadata.reply_to_message_id == "instruction-1"
    sent = out.content.array_records[protocol.ARRAYS].to_numpy_ndarrays()
    norm = np.sqrt(sum(float(np.sum(a**2)) for a in sent))  # update ones(6) from zeros: 2.45
    np.testing.assert_allclose(norm, 1.0, rtol=1e-6)
