"""Sparse/quantised links: the codec against numpy, error feedback, fuzzing, and rounds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.clients.node_links import encode_reply, receive_downlink
from fedlora.clients.node_state import NodeStore
from fedlora.lora.plan import ClientPlan
from fedlora.lora.spec import LoraSpec
from fedlora.lora.state import AdapterState, LoraFactors
from fedlora.strategies.conformance import SimulatedClient
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.ffa_lora import FfaLora
from fedlora.strategies.flora import Flora
from fedlora.strategies.lora_fair import LoraFair
from fedlora.wire import protocol
from fedlora.wire.codec import (
    INDEX,
    SCALE,
    Codec,
    CompressionError,
    decode,
    encode,
    index_dtype,
    kept,
    with_feedback,
)
from fedlora.wire.links import apply_downlink, decode_uplink, encode_downlink, encode_uplink
from fedlora.wire.records import from_arrayrecord, to_arrayrecord
from tests.helpers import FakeGrid, error_reply, flower_strategy, reply

CODECS = [
    Codec(d, v) for d in (1.0, 0.5, 0.1, 0.05, 0.01) for v in ("fp32", "fp16", "int8", "sign")
]


def test_index_type_is_the_smallest_that_fits():
    assert index_dtype(256) == np.uint8 and index_dtype(257) == np.uint16
    assert index_dtype(65_536) == np.uint16 and index_dtype(65_537) == np.uint32
    assert index_dtype(2**32 + 1) == np.uint64


def test_bad_codec_settings_name_the_value():
    with pytest.raises(ValueError, match="density 0"):
        Codec(0.0)
    with pytest.raises(ValueError, match="'int4'"):
        Codec(0.1, "int4")


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 17), min_size=1, max_size=3),
    codec=st.sampled_from(CODECS),
    seed=st.integers(0, 2**16),
)
def test_round_trip_keeps_the_top_k_entries(shape, codec, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    wire = encode({"t": x}, codec)
    y = decode(wire, {"t": x.shape})["t"]
    if codec.identity:
        np.testing.assert_array_equal(y, x)
        return
    k = kept(x.size, codec.density)
    index = wire.get("#0" + INDEX, np.arange(x.size))  # no index field: all entries
    assert index.size == k and (k == x.size or index.dtype == index_dtype(x.size))
    # independent reference: the k largest magnitudes by a full sort
    order = np.argsort(-np.abs(x.reshape(-1)), kind="stable")
    threshold = np.abs(x.reshape(-1))[order[k - 1]]
    sent = np.zeros(x.size, bool)
    sent[index.astype(np.int64)] = True
    assert np.all(np.abs(x.reshape(-1))[sent] >= threshold)
    assert np.all(np.abs(x.reshape(-1))[~sent] <= threshold)
    assert np.all(y.reshape(-1)[~sent] == 0)
    err = np.abs(y.reshape(-1)[sent] - x.reshape(-1)[sent])
    if codec.values == "fp32":
        assert err.max() == 0
    elif codec.values == "fp16":
        assert np.all(err <= 1e-3 * np.abs(x.reshape(-1)[sent]) + 1e-7)
    elif codec.values == "int8":
        assert err.max() <= float(wire["#0" + SCALE][0]) / 2 + 1e-6
    else:  # scaled sign against a direct numpy computation: +-mean|x| of the kept entries
        kept_x = x.reshape(-1)[sent].astype(np.float64)
        expected = np.where(kept_x > 0, 1.0, -1.0) * np.abs(kept_x).mean()
        np.testing.assert_allclose(y.reshape(-1)[sent], expected, rtol=1e-6)
        assert wire["#0v"].dtype == np.uint8 and wire["#0v"].size == math.ceil(k / 8)


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_scaled_sign_is_a_contraction_that_beats_top_k_on_flat_updates(density):
    """One bit per entry keeps ||x||_1^2 / (n ||x||_2^2) of the energy: on Adam-like
    updates (every entry moved by about the same amount) far more than top-k keeps."""
    rng = np.random.default_rng(8)
    x = (rng.choice([-1.0, 1.0], 4000) * rng.uniform(0.5, 1.5, 4000)).astype(np.float32)
    sent = decode(encode({"t": x}, Codec(density, "sign")), {"t": x.shape})["t"]
    if density == 1.0:
        kept_energy = np.abs(x).sum(dtype=np.float64) ** 2 / (x.size * np.sum(x.astype(float) ** 2))
        np.testing.assert_allclose(
            1 - np.sum((x - sent) ** 2) / np.sum(x**2), kept_energy, rtol=1e-4
        )
        top = decode(encode({"t": x}, Codec(0.05, "int8")), {"t": x.shape})["t"]
        assert np.sum((x - sent) ** 2) < np.sum((x - top) ** 2) / 2
    assert np.sum((x - sent) ** 2) < np.sum(x**2)  # a contraction: error feedback converges


def test_scaled_sign_of_an_all_zero_update_is_zero():
    wire = encode({"t": np.zeros((3, 5), np.float32)}, Codec(1.0, "sign"))
    assert float(wire["#0s"][0]) == 0.0
    np.testing.assert_array_equal(decode(wire, {"t": (3, 5)})["t"], np.zeros((3, 5)))


def test_identity_codec_sends_the_tensors_themselves():
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    assert encode({"t": x}, Codec())["t"] is not None
    np.testing.assert_array_equal(encode({"t": x}, Codec())["t"], x)


@pytest.mark.parametrize(
    "codec", [Codec(0.1), Codec(0.05, "int8"), Codec(0.3, "fp16"), Codec(1.0, "sign")]
)
def test_error_feedback_loses_nothing_over_rounds(codec):
    """sum(sent) + final residual = sum(true updates), up to float32 rounding."""
    rng = np.random.default_rng(1)
    residual: dict = {}
    total_true = np.zeros((20, 30))
    total_sent = np.zeros((20, 30))
    for _ in range(12):
        u = rng.standard_normal((20, 30)).astype(np.float32)
        wire, residual = with_feedback({"t": u}, residual, codec)
        total_true += u
        total_sent += decode(wire, {"t": u.shape})["t"]
    np.testing.assert_allclose(total_sent + residual["t"], total_true, atol=1e-4)
    assert np.abs(residual["t"]).max() > 0  # something really was held back


def _valid(seed: int = 0, values: str = "int8") -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((6, 9)).astype(np.float32)
    return encode({"t": x}, Codec(0.2, values))


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda w: w | {"#0i": w["#0i"][::-1].copy()}, "strictly increasing"),
        (lambda w: w | {"#0i": np.r_[w["#0i"][:-1], w["#0i"][:1]]}, "increasing"),
        (lambda w: w | {"#0i": w["#0i"] + np.uint8(60)}, "out of range"),
        (lambda w: w | {"#0i": w["#0i"].astype(np.int32)}, "unsigned"),
        (lambda w: w | {"#0v": w["#0v"][:-1]}, "lengths must match"),
        (lambda w: w | {"#0v": w["#0v"].astype(np.float64)}, "float64"),
        (lambda w: w | {"#0s": np.array([np.nan], np.float32)}, "scale is nan"),
        (lambda w: {k: v for k, v in w.items() if k != "#0s"}, "without a scale"),
        (lambda w: w | {"#0i": np.arange(60, dtype=np.uint8)}, "60 indices but"),
        (lambda w: {k: v for k, v in w.items() if k != "#0i"}, "without indices"),
        (lambda w: w | {"#1i": np.array([1], np.uint8)}, "unknown field '#1i'"),
        (lambda w: w | {"u": np.zeros(3, np.float32)}, "unexpected tensor"),
        (lambda w: w | {"#names": np.array([7], np.uint32)}, "names digest differs"),
        (lambda w: {k: v for k, v in w.items() if k != "#names"}, "missing or malformed"),
    ],
)
def test_corrupt_encodings_are_rejected_with_a_reason(corrupt, reason):
    with pytest.raises(CompressionError, match=reason):
        decode(corrupt(_valid()), {"t": (6, 9)})


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (
            lambda w: w | {"#0v": w["#0v"][:-1]},
            "11 indices but 1 byte\\(s\\) of sign bits \\(11 signs take 2\\)",
        ),
        (lambda w: w | {"#0v": np.r_[w["#0v"], w["#0v"]]}, "lengths must match"),
        (lambda w: w | {"#0s": np.array([-0.5], np.float32)}, "finite and non-negative"),
        (lambda w: w | {"#0s": np.array([np.inf], np.float32)}, "scale is inf"),
        (lambda w: {k: v for k, v in w.items() if k != "#0s"}, "without a scale"),
        (
            lambda w: {k: v for k, v in w.items() if k != "#0i"},
            "54 signs take 7\\) without indices",
        ),
        (lambda w: w | {"#0v": w["#0v"] | np.uint8(1)}, "past the last of 11 entries"),
        (lambda w: w | {"#0s": np.array([1e300])}, "one float32, got float64"),
    ],
)
def test_corrupt_sign_encodings_are_rejected_with_a_reason(corrupt, reason):
    wire = _valid(values="sign")
    assert wire["#0v"].dtype == np.uint8 and wire["#0v"].size == 2  # 11 signs in 2 bytes
    with pytest.raises(CompressionError, match=reason):
        decode(corrupt(wire), {"t": (6, 9)})


_DTYPES = [np.uint8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64, np.int8]


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from(["#0i", "#0v", "#0s", "#names", "#junk", "t", "#0"]),
    dtype=st.sampled_from(_DTYPES),
    size=st.integers(0, 70),
    ndim=st.integers(0, 2),
    seed=st.integers(0, 2**16),
    values=st.sampled_from(["int8", "sign"]),
)
def test_fuzzed_encodings_never_crash_the_decoder(field, dtype, size, ndim, seed, values):
    rng = np.random.default_rng(seed)
    raw = (
        rng.integers(-300, 300, size=size)
        if np.dtype(dtype).kind in "iu"
        else rng.normal(0, 1e5, size)
    )
    raw = np.where(rng.random(size) < 0.1, np.nan, raw) if np.dtype(dtype).kind == "f" else raw
    with np.errstate(all="ignore"):
        junk = raw.astype(dtype)
    if ndim == 0:  # a scalar where an array belongs
        junk = np.asarray(junk[0] if size else 0, dtype=dtype)
    elif ndim == 2:
        junk = junk.reshape(size, 1)
    wire = _valid(seed, values) | {field: junk}
    try:
        out = decode(wire, {"t": (6, 9)})
    except CompressionError:
        return
    assert out["t"].shape == (6, 9) and np.all(np.isfinite(out["t"]))


def test_uplink_delta_round_trip_against_a_direct_sum():
    rng = np.random.default_rng(2)
    ref = {"a": rng.standard_normal((4, 8)).astype(np.float32)}
    trained = {"a": ref["a"] + 0.1, "head": rng.standard_normal(3).astype(np.float32)}
    wire, residual = encode_uplink(trained, ref, {}, Codec(0.25))
    assert "head" in wire and "#0i" in wire and "a" not in wire  # the head has no reference
    got = decode_uplink(wire, {"a": (4, 8), "head": (3,)}, ref)
    np.testing.assert_allclose(got["a"] + residual["a"], trained["a"], atol=1e-6)
    np.testing.assert_array_equal(got["head"], trained["head"])
    with pytest.raises(CompressionError, match="must be encoded"):
        decode_uplink(trained, {"a": (4, 8), "head": (3,)}, ref)


@pytest.mark.parametrize(
    "codec, rounds, tol", [(Codec(0.2), 12, 1e-6), (Codec(1.0, "sign"), 40, 5e-2)]
)
def test_downlink_error_feedback_converges_to_the_payload(codec, rounds, tol):
    """Resending the same payload delivers it: the delta is from what the node holds."""
    payload = {"b": np.random.default_rng(3).standard_normal((10, 10)).astype(np.float32)}
    held = {"b": np.zeros((10, 10), np.float32)}
    errors = []
    for _ in range(rounds):
        held = apply_downlink(encode_downlink(payload, held, codec), held)
        errors.append(float(np.linalg.norm(held["b"] - payload["b"])))
    assert errors[-1] < tol * np.linalg.norm(payload["b"]) < errors[0]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(errors))  # contraction


# --------------------------------------------------------------------------- #
# Rounds through the strategies, with the client's own encode/decode functions  #
# --------------------------------------------------------------------------- #
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q", "v"))
UP, DOWN = Codec(0.25, "int8"), Codec(0.5, "fp16")


def _state(rng: np.random.Generator, rank: int = 4) -> AdapterState:
    """An adapter big enough that the bytes of the encoding, not its keys, dominate."""
    factors = {
        m: LoraFactors(
            a=rng.standard_normal((rank, d_in)).astype(np.float32),
            b=rng.standard_normal((d_out, rank)).astype(np.float32),
        )
        for m, (d_out, d_in) in {"m.q": (96, 64), "m.v": (64, 80)}.items()
    }
    return AdapterState(
        factors, {"m.head.weight": rng.standard_normal((10, 64)).astype(np.float32)}, SPEC.scaling
    )


class _Node:
    """A node: the real client link functions over a real NodeStore, fake training."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        context = Context(
            run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={}
        )
        self.store = NodeStore(context, None)
        self.sim = SimulatedClient(node_id, num_examples=10 * node_id, step=0.05)

    def answer(self, msg, strategy, current, rng, corrupt=None):
        cfg = msg.content.config_records[protocol.CONFIG]
        wire = from_arrayrecord(msg.content.array_records[protocol.ARRAYS])
        server_round = int(cfg[protocol.SERVER_ROUND])
        received = wire
        if protocol.DOWNLINK_BASE in cfg:
            base = int(cfg[protocol.DOWNLINK_BASE])
            try:
                received = receive_downlink(self.store, wire, base, server_round)
            except CompressionError as err:
                return error_reply(msg, str(err))
        plan = ClientPlan.from_json(cfg[protocol.PLAN])
        trained, metrics = self.sim.train(strategy.strategy, plan, received, current, rng)
        self.trained = trained
        tensors = encode_reply(
            self.store, trained, received, plan, strategy.options.uplink, server_round
        )
        if corrupt is not None:
            tensors = corrupt(tensors)
        return reply(msg, tensors, self.sim.num_examples, **metrics)


def _round(strategy, server_round, arrays, nodes, rng, corrupt=None):
    config = ConfigRecord({protocol.RUN_CONFIG: "{}"})
    grid = FakeGrid([n.node_id for n in nodes.values()])
    messages = list(strategy.configure_train(server_round, arrays, config, grid))
    current = strategy.global_state(arrays)
    replies = [
        nodes[m.metadata.dst_node_id].answer(
            m, strategy, current, rng, (corrupt or {}).get(m.metadata.dst_node_id)
        )
        for m in messages
    ]
    new_arrays, metrics = strategy.aggregate_train(server_round, replies)
    return (new_arrays or arrays), metrics, messages


@pytest.mark.parametrize("uplink", [UP, Codec(1.0, "sign")], ids=["top-k-int8", "sign"])
@pytest.mark.parametrize("cls", [FedAvg, FfaLora, Flora, LoraFair])
def test_compressed_rounds_agree_on_what_each_node_holds(cls, uplink):
    rng = np.random.default_rng(4)
    strategy = flower_strategy(
        cls, SPEC, clients_per_round=2, min_replies=2, uplink=uplink, downlink=DOWN
    )
    state = strategy.strategy.initial_state(_state(rng))
    arrays = to_arrayrecord(state.to_state_dict())
    nodes = {i: _Node(i) for i in (1, 2, 3)}
    for server_round in range(1, 6):
        arrays, metrics, messages = _round(strategy, server_round, arrays, nodes, rng)
        report = strategy.reports[server_round]
        assert report.num_ok == 2, [o.reason for o in report.outcomes]
        assert metrics["bytes-up"] < metrics["dense-up"] / 2
        if cls.exact:  # the strategy aggregates the decoded updates exactly
            assert report.aggregation_error < 1e-6
        for m in messages:  # server and node hold the same payload, bit for bit
            node = m.metadata.dst_node_id
            held_round, held = strategy.links.held(node)
            stored, meta = nodes[node].store.load(protocol.DOWNLINK_HELD)
            assert held_round == meta["round"] == server_round
            assert sorted(held) == sorted(stored)
            for key, value in held.items():
                np.testing.assert_array_equal(stored[key], value)
    sent_later = [
        m
        for m in messages
        if m.content.config_records[protocol.CONFIG][protocol.DOWNLINK_BASE] >= 0
    ]
    assert sent_later, "no node ever received a delta from what it held"


@pytest.mark.parametrize("downlink", [Codec(), Codec(0.5, "fp16")], ids=["dense", "sparse"])
def test_server_decodes_what_the_node_trained(downlink):
    """One node per round, so FedAvg's new global is that node's decoded reply: it must be
    what the node trained (up to fp16 rounding), not a delta taken for the tensors."""
    rng = np.random.default_rng(6)
    strategy = flower_strategy(
        FedAvg,
        SPEC,
        clients_per_round=1,
        min_replies=1,
        uplink=Codec(1.0, "fp16"),
        downlink=downlink,
    )
    arrays = to_arrayrecord(strategy.strategy.initial_state(_state(rng)).to_state_dict())
    nodes = {i: _Node(i) for i in (1, 2)}
    for server_round in range(1, 5):
        arrays, _, messages = _round(strategy, server_round, arrays, nodes, rng)
        trained = nodes[messages[0].metadata.dst_node_id].trained
        decoded = from_arrayrecord(arrays)
        for key, value in trained.items():
            np.testing.assert_allclose(decoded[key], value, rtol=2e-3, atol=2e-3, err_msg=key)


def test_a_corrupt_sparse_reply_is_dropped_and_the_node_recovers():
    rng = np.random.default_rng(5)
    strategy = flower_strategy(
        FedAvg, SPEC, clients_per_round=3, min_replies=2, uplink=UP, downlink=DOWN
    )
    arrays = to_arrayrecord(_state(rng).to_state_dict())
    nodes = {i: _Node(i) for i in (1, 2, 3)}

    def duplicate(tensors):
        key = next(k for k in tensors if k.startswith("#") and k.endswith(INDEX))
        idx = tensors[key].copy()
        idx[1] = idx[0]
        return tensors | {key: idx}

    arrays, _, _ = _round(strategy, 1, arrays, nodes, rng, corrupt={2: duplicate})
    outcome = {o.node_id: o for o in strategy.reports[1].outcomes}
    assert outcome[2].status == "dropped" and "strictly increasing" in outcome[2].reason
    assert outcome[1].status == outcome[3].status == "ok"
    _round(strategy, 2, arrays, nodes, rng)
    assert all(o.status == "ok" for o in strategy.reports[2].outcomes)


def test_a_node_that_lost_its_payload_gets_the_next_one_dense():
    rng = np.random.default_rng(6)
    strategy = flower_strategy(
        FedAvg, SPEC, clients_per_round=2, min_replies=1, uplink=UP, downlink=DOWN
    )
    arrays = to_arrayrecord(_state(rng).to_state_dict())
    nodes = {i: _Node(i) for i in (1, 2)}
    arrays, _, _ = _round(strategy, 1, arrays, nodes, rng)
    nodes[2] = _Node(2)  # a restarted node without a state dir: its store is empty
    arrays, _, _ = _round(strategy, 2, arrays, nodes, rng)
    outcome = {o.node_id: o for o in strategy.reports[2].outcomes}
    assert outcome[2].status == "error" and protocol.DOWNLINK_BASE in outcome[2].reason
    _, _, messages = _round(strategy, 3, arrays, nodes, rng)
    base = {
        m.metadata.dst_node_id: m.content.config_records[protocol.CONFIG][protocol.DOWNLINK_BASE]
        for m in messages
    }
    assert base == {1: 2, 2: -1}
    assert all(o.status == "ok" for o in strategy.reports[3].outcomes)


def test_dense_sizes_match_the_tensors():
    rng = np.random.default_rng(7)
    strategy = flower_strategy(FedAvg, SPEC, clients_per_round=2, min_replies=2)
    state = _state(rng)
    nodes = {i: _Node(i) for i in (1, 2)}
    _, metrics, _ = _round(strategy, 1, to_arrayrecord(state.to_state_dict()), nodes, rng)
    per_node = 4 * sum(math.prod(v.shape) for v in state.to_state_dict().values())
    assert metrics["dense-down"] == metrics["dense-up"] == 2 * per_node


def test_raw_arrays_round_trip_and_corrupt_ones_are_rejected():
    from flwr.app import Array, ArrayRecord

    from fedlora.lora.state import AdapterError
    from fedlora.wire.records import wire_bytes

    tensors = {
        "a": np.arange(6, dtype=np.float16).reshape(2, 3),
        "i": np.arange(5, dtype=np.uint16),
    }
    record = to_arrayrecord(tensors)
    for key, value in from_arrayrecord(record).items():
        np.testing.assert_array_equal(value, tensors[key])
        assert value.dtype == tensors[key].dtype
    # the raw form costs the data plus a few bytes per array, not an .npy header
    assert wire_bytes(record) < 12 + 10 + 2 * 30
    short = ArrayRecord({"a": Array(dtype="<f4", shape=(2, 3), stype="raw", data=b"\0" * 8)})
    with pytest.raises(AdapterError, match="8 bytes do not hold"):
        from_arrayrecord(short)
    odd = ArrayRecord({"a": Array(dtype="|O", shape=(1,), stype="raw", data=b"\0" * 8)})
    with pytest.raises(AdapterError, match="not a plain number type"):
        from_arrayrecord(odd)


def test_a_payload_that_drops_a_held_tensor_goes_dense_against_nothing():
    """Fed-SB's bases go once: the next payload lacks them, and a node would read every
    held tensor not sent dense as an encoded delta, so that payload is sent dense."""
    from fedlora.server.link_state import NodeLinks

    rng = np.random.default_rng(8)
    links = NodeLinks(Codec(), DOWN)
    first = {"r": rng.standard_normal((4, 4)).astype(np.float32), "bases": np.ones((3, 2))}
    _, config = links.send(1, 7, first)
    assert config[protocol.DOWNLINK_BASE] == -1
    links.settle(7, replied=True)
    second = {"r": first["r"] + 0.1}
    wire, config = links.send(2, 7, second)
    assert config[protocol.DOWNLINK_BASE] == -1  # nothing held is needed to read it
    np.testing.assert_array_equal(apply_downlink(wire, None)["r"], second["r"])
    links.settle(7, replied=True)
    wire, config = links.send(3, 7, {"r": second["r"] + 0.1})
    assert config[protocol.DOWNLINK_BASE] == 2  # same keys again: a delta from round 2
