"""Central (user-level) DP through Flower's own fixed-clipping wrappers.

The math is checked against numpy (clipping, the mean, the noise's spread) and the
epsilon against the exact privacy curve of the Gaussian mechanism; the system end to
end through the real ClientApp (Flower's ``fixedclipping_mod``) and ServerApp.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from scipy.optimize import brentq
from scipy.stats import norm

from fedlora import protocol, results
from fedlora.adapters import from_arrayrecord, to_arrayrecord
from fedlora.checkpoint import load_checkpoint
from fedlora.config import ConfigError, RunConfig
from fedlora.model import LoraSpec
from fedlora.privacy import central_epsilon
from fedlora.seeded import seeded_a
from server.central_dp import EPSILON_KEY, CentralDP
from strategies.base import StrategyOptions
from strategies.fedavg import FedAvg
from strategies.ffa_lora import FfaLora
from strategies.flora import Flora
from strategies.lora_fair import LoraFair
from tests.helpers import MODULES, FakeGrid, error_reply, random_state, simulate_in_process

RANK = 3
CENTRAL = {"central-dp": "server", "weighting": "uniform", "min-replies": 3, "clients-per-round": 3}


def _setup(mode: str, noise: float, clip: float, nodes: int = 3, min_replies: int = 3):
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
    options = StrategyOptions(
        lora=spec,
        clients_per_round=nodes,
        min_replies=min_replies,
        weighting="uniform",
        flower_numpy=True,
    )
    strategy = FedAvg(options)
    return strategy, CentralDP(strategy, cfg)


def _reply(msg: Message, tensors: dict[str, np.ndarray]) -> Message:
    content = RecordDict(
        {
            protocol.ARRAYS: to_arrayrecord(tensors, flower_numpy=True),
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: 1.0}),
        }
    )
    return Message(content, reply_to=msg)


def _round(central: CentralDP, current: dict, deltas: list[dict]):
    grid = FakeGrid(list(range(1, len(deltas) + 1)))
    messages = list(
        central.configure_train(1, to_arrayrecord(current, flower_numpy=True), ConfigRecord(), grid)
    )
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


def test_server_clipping_and_mean_match_numpy():
    """Noise 0: the new global is current + mean_k clip(delta_k), computed here in numpy."""
    rng = np.random.default_rng(0)
    strategy, central = _setup("server", noise=0.0, clip=0.5)
    current = random_state(rng, RANK).to_state_dict()
    deltas = _deltas(rng, current, [0.01, 1.0, 3.0])  # one under the clip, two over
    _, replies = _round(central, current, deltas)
    arrays, _ = central.aggregate_train(1, replies)
    got = from_arrayrecord(arrays)
    clipped = [_clipped(d, 0.5) for d in deltas]
    for k, v in current.items():
        expected = v + np.mean([c[k] for c in clipped], axis=0)
        np.testing.assert_allclose(got[k], expected, rtol=1e-5, atol=1e-6)
    assert strategy.last_report.num_ok == 3 and central.releases == 1


def test_noise_has_the_std_flower_claims():
    """z C / m on every entry of the released mean (sample std over all entries)."""
    rng = np.random.default_rng(1)
    z, clip, m = 4.0, 0.5, 3
    _, quiet = _setup("server", noise=0.0, clip=clip)
    _, noisy = _setup("server", noise=z, clip=clip)
    current = random_state(rng, RANK).to_state_dict()
    deltas = _deltas(rng, current, [1.0, 2.0, 3.0])
    reference = from_arrayrecord(quiet.aggregate_train(1, _round(quiet, current, deltas)[1])[0])
    np.random.seed(0)  # Flower draws its noise from numpy's global generator
    released = from_arrayrecord(noisy.aggregate_train(1, _round(noisy, current, deltas)[1])[0])
    noise = np.concatenate([(released[k] - reference[k]).ravel() for k in current])
    assert noise.size > 50
    assert abs(noise.std() / (z * clip / m) - 1.0) < 0.25, noise.std()
    assert abs(noise.mean()) < 3 * z * clip / m / math.sqrt(noise.size)


def test_bad_replies_are_set_aside_and_the_round_goes_on():
    """A node error and a misshapen reply never reach Flower's wrapper (which would skip
    the round, or fail inside numpy): both are recorded with reasons, the rest aggregate."""
    rng = np.random.default_rng(2)
    strategy, central = _setup("server", noise=0.0, clip=10.0, nodes=4, min_replies=2)
    current = random_state(rng, RANK).to_state_dict()
    messages, replies = _round(central, current, _deltas(rng, current, [0.1] * 4))
    replies[0] = error_reply(messages[0], "node lost")
    key = next(iter(current))
    wrong = {k: (v if k != key else v[:, :-1]) for k, v in current.items()}  # misshapen
    replies[1] = _reply(messages[1], wrong)
    arrays, _ = central.aggregate_train(1, replies)
    assert arrays is not None
    outcomes = {o.node_id: o for o in strategy.last_report.outcomes}
    assert outcomes[1].status == "error" and "node lost" in outcomes[1].reason
    assert outcomes[2].status == "dropped" and key in outcomes[2].reason
    assert "expected" in outcomes[2].reason
    assert [o.status for o in outcomes.values()].count("ok") == 2
    assert not any(o.status == "missing" for o in outcomes.values())


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
    [(Flora, "client"), (LoraFair, "client"), (FfaLora, "server"), (LoraFair, "server")],
)
def test_strategies_that_do_not_compose_are_refused(cls, mode):
    cfg = RunConfig.from_mapping({**CENTRAL, "central-dp": mode})
    spec = LoraSpec(rank=RANK, alpha=6.0, target_modules=tuple(MODULES))
    strategy = cls(StrategyOptions(lora=spec, clients_per_round=3, min_replies=3))
    with pytest.raises(ConfigError, match="central-dp.*composes with"):
        CentralDP(strategy, cfg)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"weighting": "num-examples"}, "weighting"),
        ({"min-replies": 2}, "min-replies"),
        ({"client-ranks": "4,8"}, "client-ranks"),
        ({"dp": True}, "dp"),
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


def _run(tiny_model, out, **extra):
    return {
        "model": str(tiny_model),
        "num-server-rounds": 2,
        "clients-per-round": 2,
        "min-replies": 2,
        "num-partitions": 3,
        "local-steps": 4,
        "lr": 0.02,
        "max-seq-len": 32,
        "eval-examples": 100,
        "weighting": "uniform",
        "keep-checkpoints": 0,
        "output-dir": str(out),
        **extra,
    }


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


def test_arrays_round_trip_in_flower_numpy_form():
    rng = np.random.default_rng(3)
    tensors = random_state(rng, RANK).to_state_dict()
    record = to_arrayrecord(tensors, flower_numpy=True)
    assert isinstance(record, ArrayRecord)
    assert [a.numpy().shape for a in record.values()] == [v.shape for v in tensors.values()]
    back = from_arrayrecord(record)
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
