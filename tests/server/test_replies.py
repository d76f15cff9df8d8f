"""A bad client reply is dropped with a logged reason; the round goes on with the rest."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Error
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.lora.plan import ClientPlan
from fedlora.lora.spec import LoraSpec
from fedlora.strategies.fedavg import FedAvg
from fedlora.wire import protocol
from fedlora.wire.message_size import LIMIT_BYTES, MIB, MessageTooLargeError, check_message_size
from fedlora.wire.records import from_arrayrecord, to_arrayrecord, wire_bytes
from tests.helpers import FakeGrid, error_reply, flower_strategy, random_state, reply

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q", "v"))


def _setup(min_replies=2, nodes=(11, 22, 33)):
    rng = np.random.default_rng(0)
    # plain example weights: the share cap is tested on its own
    strategy = flower_strategy(
        lora=SPEC, clients_per_round=len(nodes), min_replies=min_replies, max_share=1.0
    )
    current = random_state(rng, rank=4, scaling=SPEC.scaling)
    arrays = to_arrayrecord(current.to_state_dict())
    messages = list(strategy.configure_train(1, arrays, _config(), FakeGrid(list(nodes))))
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(nodes)
    return strategy, current, arrays, {m.metadata.dst_node_id: m for m in messages}, rng


def _config():
    from flwr.app import ConfigRecord

    return ConfigRecord({protocol.RUN_CONFIG: "{}"})


def _good(rng):
    return random_state(rng, rank=4, scaling=SPEC.scaling).to_state_dict()


def test_configure_train_sends_rank_and_round():
    _strategy, current, _, messages, _ = _setup()
    cfg = next(iter(messages.values())).content.config_records[protocol.CONFIG]
    plan = ClientPlan.from_json(cfg[protocol.PLAN])
    assert plan.rank == 4 and cfg[protocol.SERVER_ROUND] == 1
    sent = from_arrayrecord(next(iter(messages.values())).content.array_records[protocol.ARRAYS])
    for k, v in current.to_state_dict().items():
        np.testing.assert_array_equal(sent[k], v)


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (
            lambda t: {k: v for k, v in t.items() if not k.endswith("lora_B.weight")},
            "lora_A / lora_B",
        ),
        (
            lambda t: {**t, "m.q.lora_A.weight": np.zeros((4, 99), np.float32)},
            "do not fit the model",
        ),
        (lambda t: {**t, "m.v.lora_B.weight": np.full((4, 4), np.nan, np.float32)}, "NaN or Inf"),
        (
            lambda t: {
                **t,
                "m.q.lora_A.weight": np.zeros((3, 5), np.float32),
                "m.q.lora_B.weight": np.zeros((6, 3), np.float32),
            },
            "asked for 4",
        ),
        (lambda t: {**t, "m.head.weight": np.zeros((2, 2), np.float32)}, "expected (3, 4)"),
        (lambda t: {k: v for k, v in t.items() if k != "m.head.weight"}, "dense tensors differ"),
    ],
    ids=["missing-key", "wrong-shape", "nan", "wrong-rank", "wrong-dense-shape", "missing-dense"],
)
def test_bad_reply_is_dropped_and_round_aggregates_the_rest(corrupt, reason, caplog):
    strategy, _current, _, messages, rng = _setup()
    n1, n2, n3 = sorted(messages)
    good1, good2 = _good(rng), _good(rng)
    replies = [
        reply(messages[n1], good1, 10),
        reply(messages[n2], good2, 30),
        reply(messages[n3], corrupt(_good(rng)), 20),
    ]
    arrays, _metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    report = strategy.reports[1]
    bad = next(o for o in report.outcomes if o.node_id == n3)
    assert bad.status == "dropped" and reason in bad.reason
    assert report.num_ok == 2
    got = from_arrayrecord(arrays)
    want = 0.25 * good1["m.q.lora_A.weight"] + 0.75 * good2["m.q.lora_A.weight"]
    np.testing.assert_allclose(got["m.q.lora_A.weight"], want, rtol=1e-6, atol=1e-6)
    assert reason.split()[0] in caplog.text or "dropped" in caplog.text


def test_missing_metrics_and_examples_are_dropped():
    strategy, _, _, messages, rng = _setup()
    n1, n2, n3 = sorted(messages)
    from flwr.app import Message, MetricRecord, RecordDict

    no_metrics = Message(
        RecordDict({protocol.ARRAYS: to_arrayrecord(_good(rng))}), reply_to=messages[n1]
    )
    no_examples = Message(
        RecordDict(
            {
                protocol.ARRAYS: to_arrayrecord(_good(rng)),
                protocol.METRICS: MetricRecord({"train-loss": 1.0}),
            }
        ),
        reply_to=messages[n2],
    )
    replies = [no_metrics, no_examples, reply(messages[n3], _good(rng), 5)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None  # 1 valid < min_replies=2
    reasons = {o.node_id: o.reason for o in strategy.reports[1].outcomes}
    assert "MetricRecord" in reasons[n1] and protocol.NUM_EXAMPLES in reasons[n2]


def test_too_few_valid_replies_skips_round_and_keeps_global():
    strategy, _, _, messages, rng = _setup(min_replies=2)
    n1, n2, n3 = sorted(messages)
    replies = [
        reply(messages[n1], _good(rng), 10),
        error_reply(messages[n2], "node crashed"),
    ]  # n3 never replies
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None
    report = strategy.reports[1]
    assert report.skipped and "fewer than min-replies=2" in report.skip_reason
    status = {o.node_id: (o.status, o.reason) for o in report.outcomes}
    assert status[n2] == ("error", "node crashed")
    assert status[n3][0] == "missing"
    assert metrics["num-ok"] == 1


def test_round_survives_loss_of_some_clients():
    strategy, _, _, messages, rng = _setup(min_replies=1)
    n1, n2, _ = sorted(messages)
    good = _good(rng)
    arrays, _ = strategy.aggregate_train(
        1, [reply(messages[n1], good, 10), error_reply(messages[n2], "killed")]
    )
    assert arrays is not None
    for k, v in from_arrayrecord(arrays).items():
        np.testing.assert_allclose(v, good[k], rtol=1e-6)
    assert strategy.reports[1].aggregation_error < 1e-6


def test_an_error_reply_without_a_reason_is_recorded_not_fatal():
    """Flower turns an empty error reason into None; the server must not index into it."""
    strategy, _, _, messages, rng = _setup(min_replies=1)
    n1, n2, _ = sorted(messages)
    arrays, _ = strategy.aggregate_train(
        1, [reply(messages[n1], _good(rng), 10), error_reply(messages[n2], None)]
    )
    assert arrays is not None
    outcome = {o.node_id: o for o in strategy.reports[1].outcomes}[n2]
    assert outcome.status == "error" and "without a reason" in outcome.reason


def test_reply_from_unsampled_node_is_dropped():
    strategy, _, _, messages, rng = _setup(nodes=(1, 2))
    from tests.helpers import instruction

    stranger = reply(instruction(999), _good(rng), 10)
    arrays, _ = strategy.aggregate_train(
        1, [stranger, *(reply(m, _good(rng), 5) for m in messages.values())]
    )
    assert arrays is not None
    assert [o.status for o in strategy.reports[1].outcomes if o.node_id == 999] == ["dropped"]


def test_failing_strategy_keeps_global_and_reports(caplog):
    class Broken(FedAvg):
        name = "broken"

        def aggregate(self, server_round, updates, weights, current):
            raise RuntimeError("boom")

    strategy = flower_strategy(Broken, SPEC, clients_per_round=2, min_replies=1)
    rng = np.random.default_rng(0)
    arrays = to_arrayrecord(random_state(rng, rank=4).to_state_dict())
    messages = list(strategy.configure_train(1, arrays, _config(), FakeGrid([1, 2])))
    out, _ = strategy.aggregate_train(1, [reply(m, _good(rng), 5) for m in messages])
    assert out is None
    assert "Broken) failed: RuntimeError: boom" in strategy.reports[1].skip_reason


def test_sampling_is_seeded_and_skips_excluded_nodes():
    from fedlora.server.nodes import sample_nodes

    a = flower_strategy(lora=SPEC, clients_per_round=3, seed=7)
    b = flower_strategy(lora=SPEC, clients_per_round=3, seed=7)
    grid = FakeGrid(list(range(100, 120)))

    def sample(s, count):
        return sample_nodes(grid, s.nodes, s.rng, count, min_replies=2, timeout=0)

    assert sample(a, 3) == sample(b, 3)
    a.nodes.exclude(100, "budget spent")
    assert all(100 not in sample(a, 19) for _ in range(3))


def test_message_size_check_names_the_tensors():
    tensors = {"big": np.zeros((512, 1024), np.float32), "small": np.zeros(3, np.float32)}
    check_message_size(2 * MIB, tensors, 2 * MIB, "payload")  # at the limit: fine
    with pytest.raises(MessageTooLargeError) as err:
        check_message_size(2 * MIB + 1, tensors, 2 * MIB, "payload")
    text = str(err.value)
    assert "big [512, 1024] 2.0 MiB" in text and "uplink-density" in text and "lora-rank" in text


def test_payload_over_the_message_limit_fails_before_sending():
    rng = np.random.default_rng(0)
    strategy = flower_strategy(lora=SPEC, clients_per_round=2, max_message_bytes=64)
    arrays = to_arrayrecord(random_state(rng, rank=4).to_state_dict())
    with pytest.raises(MessageTooLargeError, match=r"training payload for node \d+ in round 1"):
        strategy.configure_train(1, arrays, _config(), FakeGrid([1, 2]))


def test_node_whose_payload_is_too_large_is_left_out_and_round_goes_on(caplog):
    """Mixed ranks: the rank-4 node's payload exceeds a limit the rank-1 nodes fit under."""
    rng = np.random.default_rng(0)
    current = random_state(rng, rank=4, scaling=SPEC.scaling)
    arrays = to_arrayrecord(current.to_state_dict())

    def strategy(limit: int):
        s = flower_strategy(lora=SPEC, clients_per_round=3, min_replies=2, max_message_bytes=limit)
        s.nodes.ranks = {1: 1, 2: 1, 3: 4}
        return s

    sizes = {
        m.metadata.dst_node_id: wire_bytes(m.content.array_records[protocol.ARRAYS])
        for m in strategy(LIMIT_BYTES).configure_train(1, arrays, _config(), FakeGrid([1, 2, 3]))
    }
    assert sizes[1] == sizes[2] < sizes[3]
    capped = strategy(sizes[1])
    messages = list(capped.configure_train(1, arrays, _config(), FakeGrid([1, 2, 3])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
    assert "Node 3 left out of round 1" in caplog.text
    replies = [
        reply(m, from_arrayrecord(m.content.array_records[protocol.ARRAYS]), 5) for m in messages
    ]
    out, _ = capped.aggregate_train(1, replies)
    assert out is not None
    status = {o.node_id: o.status for o in capped.reports[1].outcomes}
    assert status == {1: "ok", 2: "ok", 3: "too-large"}


def test_error_reply_made_by_the_superlink_is_matched_to_the_lost_node():
    """For a lost node the SuperLink replies itself: the reply is matched by message id."""
    strategy, _, _, messages, rng = _setup(min_replies=2)
    for node_id, m in messages.items():  # what the grid does when it pushes a message
        m.metadata.__dict__["_message_id"] = f"msg-{node_id}"
    n1, n2, n3 = sorted(messages)
    lost = error_reply(messages[n3], "node lost")
    lost.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own id, not n3
    out, _ = strategy.aggregate_train(
        1, [reply(messages[n1], _good(rng), 10), reply(messages[n2], _good(rng), 10), lost]
    )
    assert out is not None
    status = {o.node_id: o.status for o in strategy.reports[1].outcomes}
    assert status == {n1: "ok", n2: "ok", n3: "error"}  # one outcome per node, none "missing"


# --------------------------------------------------------------------------- #
# Nothing one reply holds may crash the server                                  #
# --------------------------------------------------------------------------- #
def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _huge_header() -> bytes:
    """A valid .npy header that claims 10^12 float32 entries, with 8 bytes of data."""
    header = _npy(np.zeros(2, np.float32))
    return header.replace(b"(2,)", b"(1000000000000,)")


CORRUPT_ARRAYS = {
    "numpy-empty": dict(dtype="float32", shape=(4, 5), stype="numpy.ndarray", data=b""),
    "numpy-huge-header": dict(dtype="float32", shape=(4, 5), stype="numpy.ndarray", data=b""),
    "numpy-object": dict(dtype="object", shape=(1,), stype="numpy.ndarray", data=b""),
    "unknown-stype": dict(dtype="float32", shape=(4, 5), stype="torch.tensor", data=b"\0" * 80),
    "raw-negative-shape": dict(dtype="<f4", shape=(-4, 5), stype="raw", data=b""),
    "raw-short": dict(dtype="<f4", shape=(4, 5), stype="raw", data=b"\0" * 7),
    "raw-string-dtype": dict(dtype="<U4", shape=(4, 5), stype="raw", data=b"\0" * 320),
}


@pytest.mark.parametrize("kind", sorted(CORRUPT_ARRAYS))
def test_a_corrupt_array_drops_its_reply_and_the_round_goes_on(kind):
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.app import Message as FlowerMessage

    strategy, _current, _, messages, rng = _setup()
    n1, n2, n3 = sorted(messages)
    fields = dict(CORRUPT_ARRAYS[kind])
    if kind == "numpy-huge-header":
        fields["data"] = _huge_header()
    if kind == "numpy-object":
        fields["data"] = _npy(np.array(["x"], dtype=object)).replace(b"'|O'", b"'|O'")
    tensors = {k: Array(v) for k, v in _good(rng).items()}
    tensors["m.q.lora_A.weight"] = Array(**fields)
    bad = FlowerMessage(
        RecordDict(
            {
                protocol.ARRAYS: ArrayRecord(tensors),
                protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 10}),
            }
        ),
        reply_to=messages[n3],
    )
    replies = [reply(messages[n1], _good(rng), 10), reply(messages[n2], _good(rng), 10), bad]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    status = {o.node_id: (o.status, o.reason) for o in strategy.reports[1].outcomes}
    assert status[n3][0] == "dropped" and "m.q.lora_A.weight" in status[n3][1], status[n3]
    assert status[n1][0] == status[n2][0] == "ok"


@settings(max_examples=150, deadline=None)
@given(
    stype=st.sampled_from(["raw", "numpy.ndarray", "", "x"]),
    dtype=st.sampled_from(["<f4", "float32", "<f8", "|i1", "object", "<U3", "V8", "", "<f4x"]),
    shape=st.lists(st.integers(-3, 10**12), max_size=4),
    data=st.binary(max_size=300),
    header=st.booleans(),
)
def test_fuzzed_arrays_never_crash_the_server(stype, dtype, shape, data, header):
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.app import Message as FlowerMessage
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0
    strategy, _current, _, messages, rng = _setup(min_replies=1)
    n1, _n2, n3 = sorted(messages)
    if header:  # a real .npy header in front of the random bytes
        data = _npy(np.zeros(3, np.float32))[:128] + data
    tensors = {k: Array(v) for k, v in _good(rng).items()}
    tensors["m.v.lora_B.weight"] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)
    bad = FlowerMessage(
        RecordDict(
            {
                protocol.ARRAYS: ArrayRecord(tensors),
                protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 10}),
            }
        ),
        reply_to=messages[n3],
    )
    arrays, _ = strategy.aggregate_train(1, [reply(messages[n1], _good(rng), 10), bad])
    assert arrays is not None  # the good reply is aggregated whatever the bad one holds
    assert {o.node_id: o.status for o in strategy.reports[1].outcomes}[n3] in ("dropped", "ok")


@pytest.mark.parametrize("value", [[1.0, 2.0], float("nan"), 1e300, -5, 2.5, 0], ids=repr)
def test_bad_metric_values_drop_the_reply_not_the_server(value):
    strategy, _current, _, messages, rng = _setup(min_replies=1)
    n1, n2, _ = sorted(messages)
    bad = reply(messages[n2], _good(rng), 10)
    bad.content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES] = value
    arrays, _ = strategy.aggregate_train(1, [reply(messages[n1], _good(rng), 10), bad])
    assert arrays is not None
    status = {o.node_id: o.status for o in strategy.reports[1].outcomes}
    assert status[n2] == "dropped"


class _QueryGrid(FakeGrid):
    """A grid whose nodes answer the server's QUERY with the given metrics."""

    def __init__(self, answers: dict[int, dict]) -> None:
        super().__init__(sorted(answers))
        self.answers = answers

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Message as FlowerMessage
        from flwr.app import MetricRecord, RecordDict

        out = []
        for m in messages:
            metrics = MetricRecord(self.answers[m.metadata.dst_node_id])
            msg = FlowerMessage(RecordDict({protocol.METRICS: metrics}), reply_to=m)
            msg.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            out.append(msg)
        return out


def test_a_node_describing_itself_with_nonsense_is_excluded_not_fatal():
    from flwr.app import ConfigRecord

    strategy = flower_strategy(lora=SPEC, clients_per_round=3, node_wait_timeout=0)
    grid = _QueryGrid(
        {
            1: {protocol.NODE_RANK: 4, protocol.NODE_PARTITION: 0, protocol.NUM_EXAMPLES: 90},
            2: {protocol.NODE_RANK: 4, protocol.NODE_PARTITION: float("nan")},
            3: {protocol.NODE_RANK: [4.0, 8.0]},
        }
    )
    from fedlora.server.nodes import discover_nodes

    discover_nodes(grid, strategy.nodes, ConfigRecord(), count=3, min_replies=2, timeout=1)
    assert strategy.nodes.ranks == {1: 4} and strategy.nodes.examples == {1: 90}
    assert sorted(strategy.nodes.excluded) == [2, 3]


def test_bad_evaluation_replies_are_ignored():
    from flwr.app import Message as FlowerMessage
    from flwr.app import MetricRecord, RecordDict

    from tests.helpers import instruction

    def eval_reply(node, **metrics):
        return FlowerMessage(
            RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=instruction(node)
        )

    strategy = flower_strategy(lora=SPEC)
    out = strategy.aggregate_evaluate(
        1,
        [
            eval_reply(1, **{protocol.NUM_EXAMPLES: 10, protocol.EVAL_ACCURACY: 0.5}),
            eval_reply(2, **{protocol.NUM_EXAMPLES: [1.0], protocol.EVAL_ACCURACY: 0.9}),
            eval_reply(3, **{protocol.NUM_EXAMPLES: float("nan")}),
            eval_reply(4, **{protocol.NUM_EXAMPLES: 10, protocol.EVAL_ACCURACY: [0.1]}),
        ],
    )
    assert out["num-examples"] == 20 and out[protocol.EVAL_ACCURACY] == pytest.approx(0.5)


def test_evaluation_claims_and_values_are_bounded():
    """A node claiming 2^50 evaluation examples with accuracy 1.0 does not set the
    federated accuracy (its claim is cut to 10x the others' median, its share to 0.5);
    an accuracy of 7 and a negative loss are not numbers a model can have."""
    from flwr.app import Message as FlowerMessage
    from flwr.app import MetricRecord, RecordDict

    from tests.helpers import instruction

    def eval_reply(node, **metrics):
        return FlowerMessage(
            RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=instruction(node)
        )

    n, acc, loss = protocol.NUM_EXAMPLES, protocol.EVAL_ACCURACY, protocol.EVAL_LOSS
    honest = [eval_reply(i, **{n: 10, acc: 0.5, loss: 1.0}) for i in (1, 2, 3)]
    liar = eval_reply(4, **{n: 2**50, acc: 1.0, loss: 0.0})
    out = flower_strategy(lora=SPEC).aggregate_evaluate(1, [*honest, liar])
    assert out[acc] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)  # not 1.0 - 3e-14
    assert out[loss] == pytest.approx(0.5)
    silly = eval_reply(5, **{n: 10, acc: 7.0, loss: -1.0})
    out = flower_strategy(lora=SPEC).aggregate_evaluate(1, [*honest, silly])
    assert out[acc] == pytest.approx(0.5) and out[loss] == pytest.approx(1.0)
    reasonless = FlowerMessage(Error(code=3, reason=None), reply_to=instruction(6))
    out = flower_strategy(lora=SPEC).aggregate_evaluate(1, [*honest, reasonless])
    assert out[acc] == pytest.approx(0.5) and out[n] == 30


def test_a_node_that_never_connects_costs_one_wait_not_one_per_round(monkeypatch):
    """Three nodes asked for, two ever connect: round 1 waits node-wait-timeout once for the
    third; round 2 goes on with the two at once."""
    from fedlora.server import nodes

    clock = {"now": 0.0}
    monkeypatch.setattr(nodes.time, "sleep", lambda s: clock.__setitem__("now", clock["now"] + s))
    monkeypatch.setattr(nodes.time, "monotonic", lambda: clock["now"])
    registry, rng = nodes.NodeRegistry(4), np.random.default_rng(0)
    grid = FakeGrid([1, 2])
    assert nodes.sample_nodes(grid, registry, rng, 3, min_replies=2, timeout=900) == [1, 2]
    assert 900 <= clock["now"] < 902
    waited = clock["now"]
    assert nodes.sample_nodes(grid, registry, rng, 3, min_replies=2, timeout=900) == [1, 2]
    assert clock["now"] == waited


def test_after_a_node_dies_the_next_round_does_not_wait_for_it(monkeypatch):
    """Round 1 has its three nodes; one then disappears. Round 2 samples the two that are
    left at once instead of waiting node_wait_timeout (900 s) for the third."""
    from fedlora.server import nodes

    clock = {"now": 0.0, "sleeps": 0}

    def sleep(seconds):
        clock["sleeps"] += 1
        clock["now"] += seconds

    monkeypatch.setattr(nodes.time, "sleep", sleep)
    monkeypatch.setattr(nodes.time, "monotonic", lambda: clock["now"])
    registry, rng = nodes.NodeRegistry(4), np.random.default_rng(0)
    grid = FakeGrid([1, 2, 3])

    def sample():
        return nodes.sample_nodes(grid, registry, rng, 3, min_replies=2, timeout=900)

    assert sample() == [1, 2, 3] and clock["sleeps"] == 0
    grid.node_ids = [1, 3]  # node 2 died; the SuperLink no longer lists it
    assert sample() == [1, 3]
    assert clock["sleeps"] == 0, f"waited {clock['now']:.0f} s for a dead node"
    grid.node_ids = [3]  # below min-replies: it waits, as before, up to the timeout
    sample()
    assert clock["now"] >= 900


def test_the_first_round_waits_for_a_full_sample(monkeypatch):
    from fedlora.server import nodes

    connected = iter([[1], [1, 2], [1, 2, 3]])
    grid = FakeGrid([])
    grid.get_node_ids = lambda: next(connected)
    monkeypatch.setattr(nodes.time, "sleep", lambda s: None)
    registry, rng = nodes.NodeRegistry(4), np.random.default_rng(0)
    assert nodes.sample_nodes(grid, registry, rng, 3, min_replies=2, timeout=900) == [1, 2, 3]
