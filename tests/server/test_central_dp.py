"""Central (user-level) DP through Flower's own fixed-clipping wrappers.

The math is checked against numpy (clipping, the mean, the noise's spread) and the
epsilon against the exact privacy curve of the Gaussian mechanism; the system end to
end through the real ClientApp (Flower's ``fixedclipping_mod``) and ServerApp.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from scipy.optimize import brentq
from scipy.stats import norm

from fedlora.config import ConfigError, RunConfig
from fedlora.lora.seeded import seeded_a
from fedlora.lora.spec import LoraSpec
from fedlora.privacy.accounting import central_epsilon
from fedlora.run import results
from fedlora.run.checkpoint import load_checkpoint
from fedlora.server.central_dp import EPSILON_KEY, LEDGER_FILE, CentralDP
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.ffa_lora import FfaLora
from fedlora.strategies.flora import Flora
from fedlora.strategies.lora_fair import LoraFair
from fedlora.strategies.rolora import RoLora
from fedlora.wire import protocol
from fedlora.wire.records import from_arrayrecord, to_arrayrecord
from tests.helpers import (
    MODULES,
    FakeGrid,
    error_reply,
    flower_strategy,
    random_state,
    simulate_in_process,
    tiny_run,
)

RANK = 3
CENTRAL = {"central-dp": "server", "weighting": "uniform", "min-replies": 3, "clients-per-round": 3}


def _setup(mode: str, noise: float, clip: float, out, nodes: int = 3):
    cfg = RunConfig.from_mapping(
        {
            **CENTRAL,
            "central-dp": mode,
            "central-dp-noise": noise,
            "central-dp-clip": clip,
            "clients-per-round": nodes,
            "min-replies": nodes,
        }
    )
    spec = LoraSpec(rank=RANK, alpha=2.0 * RANK, target_modules=tuple(MODULES))
    strategy = flower_strategy(
        FedAvg,
        spec,
        clients_per_round=nodes,
        min_replies=nodes,
        weighting="uniform",
        flower_numpy=True,
    )
    return strategy, CentralDP(strategy, cfg, out)


def _reply(msg: Message, tensors: dict[str, np.ndarray], flower_numpy: bool = True) -> Message:
    content = RecordDict(
        {
            protocol.ARRAYS: to_arrayrecord(tensors, flower_numpy=flower_numpy),
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: 1.0}),
        }
    )
    return Message(content, reply_to=msg)


def _round(central: CentralDP, current: dict, deltas: list[dict], server_round: int = 1):
    grid = FakeGrid(list(range(1, len(deltas) + 1)))
    record = to_arrayrecord(current, flower_numpy=True)
    messages = list(central.configure_train(server_round, record, ConfigRecord(), grid))
    replies = [
        _reply(m, {k: current[k] + d[k] for k in current})
        for m, d in zip(messages, deltas, strict=True)
    ]
    return messages, replies


def _deltas(rng: np.random.Generator, current: dict, scales: list[float]) -> list[dict]:
    return [
        {k: (s * rng.standard_normal(v.shape)).astype(np.float32) for k, v in current.items()}
        for s in scales
    ]


def _clipped(delta: dict, clip: float) -> dict:
    total = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
    factor = min(1.0, clip / total)
    return {k: v * factor for k, v in delta.items()}


def test_server_clipping_and_mean_match_numpy(tmp_path):
    """Noise 0: the new global is current + mean_k clip(delta_k), computed here in numpy."""
    rng = np.random.default_rng(0)
    strategy, central = _setup("server", noise=0.0, clip=0.5, out=tmp_path)
    current = random_state(rng, RANK).to_state_dict()
    deltas = _deltas(rng, current, [0.01, 1.0, 3.0])  # one under the clip, two over
    _, replies = _round(central, current, deltas)
    arrays, _ = central.aggregate_train(1, replies)
    got = from_arrayrecord(arrays)
    clipped = [_clipped(d, 0.5) for d in deltas]
    for k, v in current.items():
        expected = v + np.mean([c[k] for c in clipped], axis=0)
        np.testing.assert_allclose(got[k], expected, rtol=1e-5, atol=1e-6)
    assert strategy.reports[1].num_ok == 3 and central.releases == 1


def test_noise_has_the_std_flower_claims(tmp_path):
    """z C / m on every entry of the released mean (sample std over all entries)."""
    rng = np.random.default_rng(1)
    z, clip, m = 4.0, 0.5, 3
    _, quiet = _setup("server", noise=0.0, clip=clip, out=tmp_path / "quiet")
    _, noisy = _setup("server", noise=z, clip=clip, out=tmp_path / "noisy")
    current = random_state(rng, RANK).to_state_dict()
    deltas = _deltas(rng, current, [1.0, 2.0, 3.0])
    reference = from_arrayrecord(quiet.aggregate_train(1, _round(quiet, current, deltas)[1])[0])
    np.random.seed(0)  # Flower draws its noise from numpy's global generator
    released = from_arrayrecord(noisy.aggregate_train(1, _round(noisy, current, deltas)[1])[0])
    noise = np.concatenate([(released[k] - reference[k]).ravel() for k in current])
    assert noise.size > 50
    assert abs(noise.std() / (z * clip / m) - 1.0) < 0.25, noise.std()
    assert abs(noise.mean()) < 3 * z * clip / m / math.sqrt(noise.size)


def _corrupt(kind: str, msg: Message, current: dict) -> Message:
    key = next(iter(current))
    if kind == "error":
        return error_reply(msg, "node lost")
    if kind == "error without reason":  # Flower turns an empty reason into None
        return error_reply(msg, None)
    if kind == "misshapen":
        return _reply(msg, {k: (v if k != key else v[:, :-1]) for k, v in current.items()})
    if kind == "zero update":  # Flower's clipping would divide by the update's norm
        return _reply(msg, current)
    if kind == "raw form":  # Flower's clipping calls Array.numpy()
        return _reply(msg, {k: v + 1.0 for k, v in current.items()}, flower_numpy=False)
    if kind == "extra record":  # Flower's clipping clips every record, by position
        reply = _reply(msg, {k: v + 1.0 for k, v in current.items()})
        reply.content["other"] = to_arrayrecord({key: current[key]}, flower_numpy=True)
        return reply
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, status, words",
    [
        ("error", "error", "node lost"),
        ("error without reason", "error", "without a reason"),
        ("misshapen", "dropped", "expected"),
        ("zero update", "dropped", "exactly zero"),
        ("raw form", "dropped", "numpy form"),
        ("extra record", "dropped", "expected only"),
    ],
)
def test_bad_replies_are_set_aside_before_flowers_wrapper(tmp_path, kind, status, words):
    """Flower's server-side wrapper skips a round on any node error, and crashes in numpy
    (or divides by zero) on a reply it cannot clip. Such replies are recorded with their
    reason and never reach it. With fewer than m valid replies the round is skipped:
    released with too little noise it would break the guarantee; nothing is spent. The
    next round, with good replies, is released."""
    rng = np.random.default_rng(2)
    strategy, central = _setup("server", noise=0.0, clip=10.0, out=tmp_path, nodes=4)
    current = random_state(rng, RANK).to_state_dict()
    messages, replies = _round(central, current, _deltas(rng, current, [0.1] * 4))
    replies[1] = _corrupt(kind, messages[1], current)
    arrays, _ = central.aggregate_train(1, replies)
    assert arrays is None and central.releases == 0
    report = strategy.reports[1]
    outcomes = {o.node_id: o for o in report.outcomes}
    assert outcomes[2].status == status and words in outcomes[2].reason, outcomes[2]
    assert [o.status for o in report.outcomes].count("ok") == 3
    assert report.skipped and not any(o.status == "missing" for o in report.outcomes)
    assert report.metrics[EPSILON_KEY] == 0.0
    _, replies = _round(central, current, _deltas(rng, current, [0.1] * 4), server_round=2)
    arrays, _ = central.aggregate_train(2, replies)
    assert arrays is not None and central.releases == 1
    assert (tmp_path / LEDGER_FILE).is_file()


def test_a_corrupt_ledger_stops_a_resume(tmp_path):
    cfg = RunConfig.from_mapping({**CENTRAL, "resume": "latest"})
    spec = LoraSpec(rank=RANK, alpha=6.0, target_modules=tuple(MODULES))
    flower = flower_strategy(FedAvg, spec, clients_per_round=3, min_replies=3, weighting="uniform")
    (tmp_path / LEDGER_FILE).write_text('{"releases": ')
    with pytest.raises(ConfigError, match="ledger.*unreadable"):
        CentralDP(flower, cfg, tmp_path)


def test_a_node_at_another_rank_is_excluded_once(tmp_path):
    strategy, _central = _setup("client", noise=1.0, clip=1.0, out=tmp_path)
    for node in (1, 3):
        strategy.nodes.register(node, RANK)
    strategy.nodes.register(2, RANK - 1)  # FedAvg accepts mixed ranks; central DP must not
    assert set(strategy.nodes.excluded) == {2}
    assert f"lora-rank={RANK}" in strategy.nodes.excluded[2]


def test_a_strategy_built_without_the_required_settings_is_refused(tmp_path):
    cfg = RunConfig.from_mapping(CENTRAL)
    spec = LoraSpec(rank=RANK, alpha=6.0, target_modules=tuple(MODULES))
    for options in (
        {"clients_per_round": 3, "min_replies": 2, "weighting": "uniform"},
        {"clients_per_round": 3, "min_replies": 3},
    ):
        with pytest.raises(ConfigError, match="central-dp"):
            CentralDP(flower_strategy(FedAvg, spec, **options), cfg, tmp_path)


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The tight epsilon of a Gaussian mechanism of sensitivity/std ratio ``mu``
    (Balle & Wang 2018): the root of delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)."""

    def gap(eps: float) -> float:
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu) - delta

    return brentq(gap, 0.0, 500.0)


@pytest.mark.parametrize("z, rounds", [(1.0, 1), (1.0, 15), (5.0, 15), (10.0, 100)])
def test_epsilon_lies_between_the_exact_curve_and_the_classic_rdp_bound(z, rounds):
    """R releases at multiplier z compose exactly to one Gaussian with mu = sqrt(R) / z;
    an RDP accountant can only be looser than that, and no looser than the plain bound
    min_a R a / (2 z^2) + log(1/delta) / (a - 1)."""
    delta = 1e-5
    eps = central_epsilon(z, rounds, delta)
    exact = _exact_gaussian_epsilon(math.sqrt(rounds) / z, delta)
    orders = np.linspace(1.01, 512, 200_000)
    classic = float(np.min(rounds * orders / (2 * z * z) + math.log(1 / delta) / (orders - 1)))
    assert exact <= eps <= classic + 1e-9, (exact, eps, classic)
    assert central_epsilon(z, rounds + 1, delta) > eps  # it grows with every release
    assert central_epsilon(z, 0, delta) == 0.0 and central_epsilon(0.0, 1, delta) == math.inf


@pytest.mark.parametrize(
    "cls, mode",
    [
        (Flora, "client"),
        (Flora, "server"),
        (LoraFair, "client"),
        (LoraFair, "server"),
        (FfaLora, "server"),
        (RoLora, "client"),  # replies leave out the frozen factor fixedclipping_mod was sent
    ],
)
def test_strategies_that_do_not_compose_are_refused(cls, mode, tmp_path):
    cfg = RunConfig.from_mapping({**CENTRAL, "central-dp": mode})
    spec = LoraSpec(rank=RANK, alpha=6.0, target_modules=tuple(MODULES))
    strategy = flower_strategy(cls, spec, clients_per_round=3, min_replies=3)
    with pytest.raises(ConfigError, match="central-dp.*composes with"):
        CentralDP(strategy, cfg, tmp_path)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"weighting": "num-examples"}, "weighting"),
        ({"min-replies": 2}, "min-replies"),
        ({"client-ranks": "4,8"}, "client-ranks"),
        ({"dp": True, "central-dp": "client"}, "dp"),
        ({"uplink-density": 0.1}, "uplink-density"),
        ({"downlink-values": "int8"}, "downlink-values"),
        ({"central-dp": "both"}, "central-dp"),
        ({"central-dp-clip": 0.0}, "central-dp-clip"),
        ({"central-dp-delta": 1.0}, "central-dp-delta"),
    ],
)
def test_settings_that_would_falsify_epsilon_are_refused(change, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_mapping({**CENTRAL, "clients-per-round": 3, **change})


CENTRAL_RUN = {
    "local-steps": 4,
    "eval-examples": 100,
    "weighting": "uniform",
    "keep-checkpoints": 0,
}


def _run(tiny_model, out, **extra):
    """The end-to-end tests' tiny run, with what central DP needs (uniform weighting) and
    every round's checkpoint kept."""
    return tiny_run(tiny_model, out, **{**CENTRAL_RUN, **extra})


def _global(out, server_round: int) -> dict[str, np.ndarray]:
    state, _ = load_checkpoint(out / "checkpoints" / f"round-{server_round:04d}")
    return state.to_state_dict()


def _round_two_step(out) -> float:
    """Norm of the global adapter's change in round 2 (all tensors together)."""
    before, after = _global(out, 1), _global(out, 2)
    return math.sqrt(sum(float(np.sum((after[k] - before[k]) ** 2)) for k in after))


@pytest.fixture(scope="module")
def plain_step(tiny_model, tmp_path_factory) -> float:
    """The same run without central DP: how far round 2 moves the global unclipped."""
    out = tmp_path_factory.mktemp("plain") / "run"
    simulate_in_process(_run(tiny_model, out))
    return _round_two_step(out)


@pytest.mark.parametrize("mode", ["client", "server"])
def test_each_round_moves_the_global_by_at_most_the_clip(tiny_model, tmp_path, mode, plain_step):
    """Noise 0, a clip far below the updates' size: the mean of the clipped updates, and so
    the global's step, has norm <= C, whoever clips (the node's fixedclipping_mod or the
    server); without central DP the same run moves more than 100 C."""
    clip = 1e-3
    out = tmp_path / "run"
    extra = {"central-dp": mode, "central-dp-noise": 0.0, "central-dp-clip": clip}
    simulate_in_process(_run(tiny_model, out, **extra))
    records = results.read_records(out)
    assert all(rec["num_ok"] == 2 for rec in records[1:])
    assert _round_two_step(out) <= clip * (1 + 1e-4)
    assert plain_step > 100 * clip
    assert records[-1]["metrics"][EPSILON_KEY] is None  # infinite (no noise), null in JSON
    assert "epsilon inf" in (out / results.SUMMARY_FILE).read_text()


@pytest.mark.slow  # central DP with fedavg stays in the default suite
def test_ffa_lora_with_client_clipping_keeps_the_seeded_a(tiny_model, tmp_path):
    """Flower noises every tensor it gets back, A included: FFA-LoRA's global keeps the
    seeded A its nodes use. The ledger reports the epsilon of the rounds released, and a
    run stopped after round 1 and resumed carries on from it rather than from zero."""
    out = tmp_path / "ffa"
    z = 2.0
    extra = {"strategy": "ffa_lora", "central-dp": "client", "central-dp-noise": z}
    extra |= {"central-dp-clip": 0.01}
    simulate_in_process(_run(tiny_model, out, **extra, **{"num-server-rounds": 1}))
    simulate_in_process(_run(tiny_model, out, **extra, resume="latest"))
    records = results.read_records(out)
    for r in (1, 2):
        assert records[r]["metrics"][EPSILON_KEY] == pytest.approx(central_epsilon(z, r, 1e-5))
    final = _global(out, 2)
    for key, value in final.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            np.testing.assert_array_equal(value, seeded_a(module, 8, value.shape[1], 0))
    summary = (out / results.SUMMARY_FILE).read_text()
    assert f"epsilon {central_epsilon(z, 2, 1e-5):.4g}" in summary
    assert json.loads((out / LEDGER_FILE).read_text())["releases"] == 2


def test_arrays_round_trip_in_flower_numpy_form():
    rng = np.random.default_rng(3)
    tensors = random_state(rng, RANK).to_state_dict()
    record = to_arrayrecord(tensors, flower_numpy=True)
    assert isinstance(record, ArrayRecord)
    assert [a.numpy().shape for a in record.values()] == [v.shape for v in tensors.values()]
    back = from_arrayrecord(record)
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
