"""Server end of the compressed links: what each node holds, and decoding its replies.

Strategies never see an encoding: :class:`NodeLinks` turns a strategy's payload into
the wire form for one node and a reply's wire form back into dense tensors, before and
after the strategy's own hooks. With both codecs the identity it passes tensors through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedlora.lora.base_merge import without_stacks
from fedlora.lora.plan import ClientPlan
from fedlora.wire import protocol
from fedlora.wire.codec import Codec
from fedlora.wire.links import apply_downlink, decode_uplink, encode_downlink


class NodeLinks:
    """Per-node state of the downlink (the payload each node holds) and the uplink."""

    def __init__(self, uplink: Codec, downlink: Codec) -> None:
        self.uplink = uplink
        self.downlink = downlink
        self._held: dict[int, tuple[int, dict[str, np.ndarray]]] = {}
        self._pending: dict[int, tuple[int, dict[str, np.ndarray]]] = {}
        self._received: dict[int, dict[str, np.ndarray]] = {}

    def send(
        self, server_round: int, node_id: int, payload: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """The wire form of ``payload`` for ``node_id`` and the config entries it needs."""
        if self.downlink.identity:
            self._received[node_id] = dict(payload)
            return dict(payload), {}
        held_round, held = self._held.get(node_id, (-1, None))
        if held is not None and not set(held) <= set(payload):
            # the payload drops a tensor the node holds (Fed-SB's bases, sent once): the
            # node would read it as an encoded delta, so this payload goes dense
            held_round, held = -1, None
        wire = encode_downlink(payload, held, self.downlink)
        received = apply_downlink(wire, held)
        self._received[node_id] = received
        kept = without_stacks(received)
        self._pending[node_id] = (server_round, kept)
        return wire, {protocol.DOWNLINK_BASE: held_round}

    def settle(self, node_id: int, replied: bool) -> None:
        """After the round: a node that replied holds this round's payload; else unknown.

        Forgetting is safe: the next payload to that node goes dense.
        """
        pending = self._pending.pop(node_id, None)
        if not replied:
            self._held.pop(node_id, None)
        elif pending is not None:
            self._held[node_id] = pending
        self._received.pop(node_id, None)

    def held(self, node_id: int) -> tuple[int, dict[str, np.ndarray]] | None:
        """The round and tensors of the payload ``node_id`` is known to hold (None: unknown)."""
        return self._held.get(node_id)

    def state_dict(self) -> dict[str, Any]:
        """What each node holds, for a checkpoint (a resumed run then sends deltas too)."""
        return {
            str(node): {"round": held_round, "tensors": dict(tensors)}
            for node, (held_round, tensors) in self._held.items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a node missing from it gets a dense payload next."""
        self._held = {
            int(node): (
                int(entry["round"]),
                {k: np.asarray(v, np.float32) for k, v in entry["tensors"].items()},
            )
            for node, entry in state.items()
        }

    def receive(
        self,
        node_id: int,
        wire: Mapping[str, np.ndarray],
        shapes: Mapping[str, tuple[int, ...]],
        plan: ClientPlan,
    ) -> dict[str, np.ndarray]:
        """The dense tensors ``node_id`` trained, from its reply (raises CompressionError).

        The uplink sends deltas from the start of each tensor that both ends can rebuild
        (:meth:`~fedlora.lora.plan.ClientPlan.reference`).
        """
        if self.uplink.identity:
            return dict(wire)
        reference = plan.reference(shapes, self._received.get(node_id, {}))
        return decode_uplink(wire, shapes, reference)
