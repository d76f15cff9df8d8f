"""The server's SecAgg+ driver over a Grid whose nodes run the real node-side handlers.

Nodes answer with :mod:`fedlora.clients.secure_node` (the ClientApp's own code) and fixed
"trained" tensors; the grid loses the replies a test asks it to, so dropouts happen at
a chosen stage.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedlora.clients import secure_node
from fedlora.secagg.protocol import SecAggParams
from fedlora.server.secure_aggregation import STAGE_TYPE, secure_round
from fedlora.wire import protocol
from fedlora.wire.records import to_arrayrecord

SHAPES = {"m.lora_B.weight": (6, 2), "head.weight": (2, 6)}


class DroppingGrid:
    """Routes each message to its node's handler; ``lose`` maps a stage to nodes that vanish."""

    def __init__(self, tensors: dict[int, dict[str, np.ndarray]], lose: dict[str, set[int]]):
        self.tensors, self.lose = tensors, lose
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in tensors
        }
        self.seen: dict[int, list[Message]] = {n: [] for n in tensors}

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            config = msg.content.config_records[protocol.CONFIG]
            stage = str(config.get(protocol.SECAGG_STAGE, "collect-masked"))
            if node in self.lose.get(stage, set()):
                continue
            context = self.contexts[node]
            if msg.metadata.message_type == STAGE_TYPE:
                replies.append(secure_node.handle_stage(msg, context))
                continue
            masked = secure_node.mask_reply(msg, context, self.tensors[node])
            content = RecordDict(
                {
                    protocol.ARRAYS: to_arrayrecord({protocol.SECAGG_MASKED: masked}),
                    protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 10}),
                }
            )
            reply = Message(content, reply_to=msg)
            self.seen[node].append(reply)
            replies.append(reply)
        return replies


def _train(node: int) -> Message:
    config = ConfigRecord({protocol.SERVER_ROUND: 4})
    return Message(
        RecordDict({protocol.CONFIG: config}), dst_node_id=node, message_type=MessageType.TRAIN
    )


@pytest.mark.parametrize(
    "lose, took_part",
    [
        ({}, [1, 2, 3, 4, 5]),
        ({"unmask": {2}}, [1, 2, 3, 4, 5]),  # dropped after masking: still in the sum
        ({"collect-masked": {5}}, [1, 2, 3, 4]),  # shared keys, never masked
        ({"setup": {1}, "unmask": {4}}, [2, 3, 4, 5]),
    ],
)
def test_secure_round_sums_what_the_survivors_sent(lose, took_part):
    rng = np.random.default_rng(0)
    tensors = {
        n: {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in SHAPES.items()}
        for n in range(1, 6)
    }
    weights = {n: w for n, w in zip(range(1, 6), rng.dirichlet(np.ones(5)), strict=True)}
    grid = DroppingGrid(tensors, lose)
    params = SecAggParams(num_shares=5, threshold=3)
    result = secure_round(
        grid,
        4,
        [_train(n) for n in range(1, 6)],
        lambda n: params,
        weights,
        SHAPES,
        timeout=1,
        seed=0,
    )
    assert result.mean is not None, result.skip_reason
    assert sorted(result.survivors) == took_part
    w = np.array([weights[n] for n in took_part])
    for key in SHAPES:
        reference = sum(weights[n] * tensors[n][key].astype(np.float64) for n in took_part)
        np.testing.assert_allclose(
            result.mean[key], reference / w.sum(), atol=2 * len(took_part) * params.step, rtol=0
        )
    lost = set().union(*lose.values()) if lose else set()
    assert set(result.failed) == lost
    assert result.metrics["secagg-bytes-up-collect-masked"] == 4 * 25 * len(took_part)


def test_too_many_dropouts_skip_the_round_with_the_reason():
    tensors = {n: {k: np.ones(s, np.float32) for k, s in SHAPES.items()} for n in range(1, 5)}
    grid = DroppingGrid(tensors, {"collect-masked": {1, 2}})
    result = secure_round(
        grid,
        4,
        [_train(n) for n in range(1, 5)],
        lambda n: SecAggParams(num_shares=4, threshold=3),
        {n: 0.25 for n in range(1, 5)},
        SHAPES,
        timeout=1,
        seed=0,
    )
    assert result.mean is None
    assert "2 nodes left after the collect-masked stage" in result.skip_reason
    assert "secagg-threshold=3" in result.skip_reason


def test_what_the_server_receives_from_one_node_is_at_chance():
    """The masked vector one node sent, against its true (weighted, quantised) update."""
    rng = np.random.default_rng(1)
    big = {"m.lora_B.weight": (64, 8), "head.weight": (4, 64)}
    tensors = {
        n: {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in big.items()}
        for n in range(1, 5)
    }
    grid = DroppingGrid(tensors, {})
    secure_round(
        grid,
        4,
        [_train(n) for n in range(1, 5)],
        lambda n: SecAggParams(num_shares=4, threshold=3),
        {n: 0.25 for n in range(1, 5)},
        big,
        timeout=1,
        seed=0,
    )
    from fedlora.wire.records import from_arrayrecord

    (reply,) = grid.seen[1]
    received = from_arrayrecord(reply.content.array_records[protocol.ARRAYS])
    seen = received[protocol.SECAGG_MASKED].astype(np.float64)[:-1]
    truth = np.concatenate([np.ravel(tensors[1][k]) for k in sorted(big)])
    assert abs(np.corrcoef(seen, truth)[0, 1]) < 4 / np.sqrt(truth.size)


class CorruptingGrid(DroppingGrid):
    """A grid whose ``node`` answers ``stage`` with altered content."""

    def __init__(self, tensors, node: int, stage: str):
        super().__init__(tensors, {})
        self.node, self.stage = node, stage

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        for reply in replies:
            config = reply.content.config_records.get(protocol.CONFIG)
            if reply.metadata.src_node_id != self.node or config is None:
                continue
            if self.stage == "share-keys" and protocol.SECAGG_CIPHERTEXTS in config:
                # leaves one neighbour without its share
                config[protocol.SECAGG_NODES] = config[protocol.SECAGG_NODES][1:]
                config[protocol.SECAGG_CIPHERTEXTS] = config[protocol.SECAGG_CIPHERTEXTS][1:]
            if self.stage == "unmask" and protocol.SECAGG_SHARES in config:  # forged shares
                config[protocol.SECAGG_SHARES] = [
                    s[:4] + bytes(len(s) - 4) for s in config[protocol.SECAGG_SHARES]
                ]
        return replies


def _tensors(num: int):
    rng = np.random.default_rng(2)
    return {
        n: {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in SHAPES.items()}
        for n in range(1, num + 1)
    }


def test_a_node_that_leaves_a_neighbour_out_is_left_out_and_the_sum_stays_right():
    tensors = _tensors(5)
    grid = CorruptingGrid(tensors, node=3, stage="share-keys")
    weights = {n: 0.2 for n in tensors}
    result = secure_round(
        grid,
        4,
        [_train(n) for n in tensors],
        lambda n: SecAggParams(5, 3),
        weights,
        SHAPES,
        timeout=1,
        seed=0,
    )
    assert "not one share for each of its neighbours" in result.failed[3]
    assert result.mean is not None and sorted(result.survivors) == [1, 2, 4, 5]
    reference = sum(tensors[n]["head.weight"].astype(np.float64) for n in (1, 2, 4, 5)) / 4
    np.testing.assert_allclose(result.mean["head.weight"], reference, atol=1e-4)


def test_forged_shares_skip_the_round_instead_of_aggregating_garbage():
    tensors = _tensors(4)
    grid = CorruptingGrid(tensors, node=1, stage="unmask")
    result = secure_round(
        grid,
        4,
        [_train(n) for n in tensors],
        lambda n: SecAggParams(min(n, 4), 3),
        {n: 0.25 for n in tensors},
        SHAPES,
        timeout=1,
        seed=0,
    )
    assert result.mean is None
    assert "inconsistent shares or masks" in result.skip_reason or "unmasking failed" in (
        result.skip_reason
    )


def test_nodes_without_weight_are_not_asked():
    tensors = _tensors(4)
    weights = {1: 0.5, 2: 0.5, 3: 0.0, 4: 0.0}
    grid = DroppingGrid(tensors, {"setup": {1, 2}})
    result = secure_round(
        grid,
        4,
        [_train(n) for n in tensors],
        lambda n: SecAggParams(n, 2),
        weights,
        SHAPES,
        timeout=1,
        seed=0,
    )
    assert result.mean is None and "weight 0" in result.failed[3]
    assert "0 nodes left after the setup stage" in result.skip_reason  # 3 and 4 never asked
