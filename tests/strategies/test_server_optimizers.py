"""FedAvgM, FedAdam and FedYogi on the aggregate, against element-wise references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.config import ConfigError, RunConfig
from fedlora.lora.server_optimizer import ServerOptimizer, ServerOptimizerSpec
from fedlora.lora.state import AdapterState, LoraFactors
from fedlora.run.checkpoint import restore_state, serialise_state
from fedlora.run.registry import check_strategy_config, load_strategy_class
from fedlora.strategies.conformance import check_strategy


def _state(rng: np.random.Generator) -> AdapterState:
    factors = {"m": LoraFactors(rng.standard_normal((2, 5)).astype(np.float32),
                                rng.standard_normal((4, 2)).astype(np.float32))}  # fmt: skip
    return AdapterState(factors, {"head": rng.standard_normal(3).astype(np.float32)}, 2.0)


def _reference(kind: str, xs: list[float], targets: list[list[float]], spec) -> list[float]:
    """Reddi et al.'s Algorithm 2 (and FedAvgM), one scalar at a time, in Python floats."""
    eta = spec.step_size
    out = []
    for i, x in enumerate(xs):
        m, u = 0.0, spec.tau**2
        for target in targets:
            delta = target[i] - x
            if kind == "fedavgm":
                m = spec.momentum * m + delta
                x = x + eta * m
                continue
            m = spec.beta1 * m + (1 - spec.beta1) * delta
            if kind == "fedadam":
                u = spec.beta2 * u + (1 - spec.beta2) * delta**2
            else:
                sign = (u - delta**2 > 0) - (u - delta**2 < 0)
                u = u - (1 - spec.beta2) * delta**2 * sign
            x = x + eta * m / (math.sqrt(u) + spec.tau)
        out.append(x)
    return out


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi"])
def test_three_rounds_match_the_papers_update_rule(kind):
    """Three rounds in which the aggregate lands near the current adapter each time."""
    rng = np.random.default_rng(1)
    spec = ServerOptimizerSpec(kind=kind, lr=0.3 if kind == "fedavgm" else 0.05)
    opt = ServerOptimizer(spec)
    current = _state(rng)
    flat0 = [
        float(v) for v in np.concatenate([t.ravel() for t in current.to_state_dict().values()])
    ]
    targets = []
    for _ in range(3):
        aggregate = AdapterState(
            {"m": LoraFactors(*(x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
                                for x in (current.factors["m"].a, current.factors["m"].b)))},
            {"head": current.dense["head"] + np.float32(0.1)},
            current.scaling,
        )  # fmt: skip
        targets.append(
            [
                float(v)
                for v in np.concatenate([t.ravel() for t in aggregate.to_state_dict().values()])
            ]
        )
        current = opt.step(current, aggregate)
    got = np.concatenate([t.ravel() for t in current.to_state_dict().values()])
    # the reference re-derives x from the same aggregates (their deltas are against its own x)
    want = np.array(_reference(kind, flat0, targets, spec))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fedavgm_without_momentum_at_step_one_is_the_aggregate():
    rng = np.random.default_rng(2)
    current, aggregate = _state(rng), _state(rng)
    out = ServerOptimizer(ServerOptimizerSpec("fedavgm", lr=1.0, momentum=0.0)).step(
        current, aggregate
    )
    for key, value in aggregate.to_state_dict().items():
        np.testing.assert_array_equal(out.to_state_dict()[key], value)


def test_moments_survive_a_checkpoint():
    rng = np.random.default_rng(3)
    spec = ServerOptimizerSpec("fedyogi", lr=0.05)
    opt, clone = ServerOptimizer(spec), ServerOptimizer(spec)
    current = _state(rng)
    current = opt.step(current, _state(rng))
    clone.load_state_dict(restore_state(*serialise_state(opt.state_dict())))
    nxt = _state(rng)
    a, b = opt.step(current, nxt), clone.step(current, nxt)
    for key, value in a.to_state_dict().items():
        np.testing.assert_array_equal(b.to_state_dict()[key], value)


def test_a_frozen_factor_stays_frozen():
    """FFA-LoRA's A does not move (Δ = 0): the optimisers leave it exactly where it was."""
    rng = np.random.default_rng(4)
    current = _state(rng)
    aggregate = AdapterState(
        {"m": LoraFactors(current.factors["m"].a, current.factors["m"].b + 1.0)},
        current.dense,
        current.scaling,
    )
    for kind in ("fedavgm", "fedadam", "fedyogi"):
        out = ServerOptimizer(ServerOptimizerSpec(kind)).step(current, aggregate)
        np.testing.assert_array_equal(out.factors["m"].a, current.factors["m"].a)


def test_only_strategies_that_claim_it_get_a_server_optimizer_and_the_kit_checks_claims():
    for name in ("fedavg", "ffa_lora", "lora_fair"):
        check_strategy_config(name, {}, [8], 8, server_optimizer="fedadam")
    with pytest.raises(ConfigError, match="server-optimizer.*'flora'.*re-initialises"):
        check_strategy_config("flora", {}, [8], 8, server_optimizer="fedadam")
    with pytest.raises(ConfigError, match="mixed client-ranks.*'fedavg' is not exact"):
        check_strategy_config("fedavg", {}, [4, 8], 8, server_optimizer="fedyogi")
    check_strategy_config("ffa_lora", {}, [4, 8], 8, server_optimizer="fedyogi")  # exact

    class ClaimsItWrongly(load_strategy_class("flora")):
        server_optimizer = True

    failed = {r.name: r.detail for r in check_strategy(ClaimsItWrongly) if not r.passed}
    assert "server optimiser claim" in failed, failed


def test_bad_server_optimizer_settings_name_the_key():
    with pytest.raises(ConfigError, match="'server-optimizer': 'adam' must be one of"):
        RunConfig(server_optimizer="adam")
    with pytest.raises(ConfigError, match="'server-beta2': 1.0 must be in"):
        RunConfig(server_optimizer="fedadam", server_beta2=1.0)
    with pytest.raises(ConfigError, match="'server-optimizer'.*central-dp='server'"):
        RunConfig(server_optimizer="fedadam", central_dp="server")
    assert RunConfig(server_optimizer="fedadam").server_optimizer_spec.step_size == 0.01
