"""Every strategy's math against independent numpy references, on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.model import LoraSpec
from fedlora.seeded import seeded_a
from strategies.base import StrategyOptions, aggregation_error
from strategies.conformance import SimulatedClient, simulate_round
from strategies.fedavg import FedAvg
from strategies.ffa_lora import FfaLora
from strategies.lora_fair import LoraFair, ridge_correction
from tests.helpers import random_state


def _make(cls, ranks, seed=0, alpha=16.0, **extra):
    r_max = max(ranks)
    strategy = cls(StrategyOptions(lora=LoraSpec(r_max, alpha, ("q", "v")), seed=seed, extra=extra))
    for node, r in enumerate(ranks):
        strategy.register_node(node, r)
    rng = np.random.default_rng(seed)
    current = strategy.initial_state(random_state(rng, r_max, strategy.scaling(r_max)))
    return strategy, current, rng


def _direct(updates, weights, state):
    """Relative error computed from materialised d_out x d_in products."""
    num = den = 0.0
    for m, f in state.factors.items():
        ideal = sum(
            w
            * u.state.scaling
            * u.state.factors[m].b.astype(np.float64)
            @ u.state.factors[m].a.astype(np.float64)
            for u, w in zip(updates, weights, strict=True)
        )
        got = state.scaling * f.b.astype(np.float64) @ f.a.astype(np.float64)
        num += np.sum((ideal - got) ** 2)
        den += np.sum(ideal**2)
    return np.sqrt(num / den)


def _round(cls, ranks, n, seed=0, **extra):
    strategy, current, rng = _make(cls, ranks, seed, **extra)
    clients = [SimulatedClient(i, int(n_i)) for i, n_i in enumerate(n)]
    updates = simulate_round(strategy, 1, current, clients, rng)
    w = np.asarray(n, float) / np.sum(n)
    return strategy, current, updates, w, strategy.aggregate(1, updates, w, current)


def test_seeded_a_is_nested_and_deterministic():
    a16 = seeded_a("layer.0.q", 16, 10, seed=3)
    np.testing.assert_array_equal(seeded_a("layer.0.q", 4, 10, seed=3), a16[:4])
    assert not np.array_equal(seeded_a("layer.0.v", 4, 10, seed=3), a16[:4])
    assert not np.array_equal(seeded_a("layer.0.q", 4, 10, seed=4), a16[:4])
    assert np.abs(a16).max() <= 1 / np.sqrt(10)


@pytest.mark.parametrize("ranks", [(8, 8, 8), (4, 8, 16), (1, 2, 3, 16)])
def test_ffa_lora_is_exact_for_mixed_ranks(ranks):
    _strategy, current, updates, w, out = _round(
        FfaLora, ranks, n=range(10, 10 + 7 * len(ranks), 7)
    )
    assert _direct(updates, w, out) < 1e-6
    assert aggregation_error(updates, w, out) < 1e-6
    for m, f in out.factors.items():  # A never changes and equals the seeded draw
        np.testing.assert_array_equal(f.a, current.factors[m].a)
        np.testing.assert_array_equal(f.a, seeded_a(m, max(ranks), f.a.shape[1], 0))


def test_ffa_lora_payload_and_reply_never_carry_a():
    strategy, current, rng = _make(FfaLora, (4, 8))
    plan = strategy.client_plan(1, 0)
    assert plan.freeze_a and plan.a_from_seed and not plan.send_a
    payload = strategy.payload(1, 0, plan, current)
    assert not any(k.endswith("lora_A.weight") for k in payload)
    assert payload["m.q.lora_B.weight"].shape == (6, 4)
    reply = SimulatedClient(0, 5).train(plan, payload, current, rng)
    assert not any(k.endswith("lora_A.weight") for k in reply)
    with pytest.raises(ValueError, match="must never be sent"):
        strategy.decode_update(1, plan, {**reply, "m.q.lora_A.weight": np.zeros((4, 5))}, current)


def test_fedavg_with_mixed_ranks_is_inexact_but_measured():
    _, _, updates, w, out = _round(FedAvg, (4, 8, 16), n=(10, 20, 30))
    e = aggregation_error(updates, w, out)
    assert e > 1e-3
    assert np.isclose(e, _direct(updates, w, out), rtol=1e-5)


def test_lora_fair_never_worse_than_fedavg_and_reports_floor():
    strategy, _, updates, w, out = _round(LoraFair, (8, 8, 8, 8), n=(5, 10, 20, 40))
    e_fair = aggregation_error(updates, w, out)
    extra = strategy.extra_round_metrics(updates, w, None, out)
    assert e_fair <= extra["fedavg-error"] + 1e-9
    assert extra["fair-floor"] <= e_fair + 1e-6
    assert e_fair < extra["fedavg-error"]  # the correction helps on random clients


def test_ridge_with_lambda_zero_is_least_squares():
    rng = np.random.default_rng(0)
    terms = [
        (rng.uniform(0.1, 1), rng.normal(size=(7, 3)), rng.normal(size=(3, 9))) for _ in range(3)
    ]
    a_bar, b_bar, s = rng.normal(size=(3, 9)), rng.normal(size=(7, 3)), 2.0
    db = ridge_correction(terms, a_bar.astype(np.float32), b_bar.astype(np.float32), s, 0.0)
    target = sum(c * b @ a for c, b, a in terms)
    # independent least squares: min_B ||target/s - B a_bar||  <=>  a_bar^T B^T = target^T / s
    b_ls = np.linalg.lstsq(a_bar.T, target.T / s, rcond=None)[0].T
    np.testing.assert_allclose(b_bar + db, b_ls, rtol=1e-4, atol=1e-4)


def test_lora_fair_cosine_option_runs_and_is_not_worse():
    strategy, _, updates, w, out = _round(
        LoraFair, (4, 4, 4), n=(1, 1, 1), **{"fair-method": "cosine", "fair-steps": 20}
    )
    extra = strategy.extra_round_metrics(updates, w, None, out)
    assert aggregation_error(updates, w, out) <= extra["fedavg-error"] + 1e-9


def test_lora_fair_rejects_bad_settings():
    with pytest.raises(ValueError, match="'fair-method': 'svd'"):
        _make(LoraFair, (4,), **{"fair-method": "svd"})
    with pytest.raises(ValueError, match="'fair-lambda': -1.0"):
        _make(LoraFair, (4,), **{"fair-lambda": -1})


def test_strategy_refuses_ranks_it_cannot_take():
    strategy, _, _ = _make(LoraFair, (8,))
    strategy.register_node(5, 4)
    assert 5 in strategy.excluded_nodes and "heterogeneous" in strategy.excluded_nodes[5]
    strategy.register_node(6, 99)
    assert "outside [1, lora-rank=8]" in strategy.excluded_nodes[6]


STRATEGIES = [FedAvg, FfaLora, LoraFair]


@settings(max_examples=25, deadline=None)
@given(
    idx=st.integers(0, len(STRATEGIES) - 1),
    seed=st.integers(0, 10_000),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    n=st.lists(st.integers(1, 100), min_size=4, max_size=4),
)
def test_property_every_strategy_random_inputs(idx, seed, ranks, n):
    cls = STRATEGIES[idx]
    if not cls.heterogeneous_ranks:
        ranks = [max(ranks)] * len(ranks)
    _strategy, current, updates, w, out = _round(cls, ranks, n=n[: len(ranks)], seed=seed)
    assert set(out.factors) == set(current.factors)
    for m, f in out.factors.items():
        assert f.a.dtype == np.float32 and f.b.dtype == np.float32
        assert f.a.shape == current.factors[m].a.shape and f.b.shape == current.factors[m].b.shape
    e = aggregation_error(updates, w, out)
    assert np.isclose(e, _direct(updates, w, out), rtol=1e-4, atol=1e-6)
    if cls.exact:
        assert e < 1e-5
    if len(ranks) == 1 and cls is not FfaLora:
        assert e < 1e-5  # a single client is reproduced exactly
