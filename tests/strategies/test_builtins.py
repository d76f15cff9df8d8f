"""Every strategy's math against independent numpy references, on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.config.settings import parse_settings
from fedlora.lora.seeded import seeded_a
from fedlora.lora.spec import LoraSpec
from fedlora.strategies.api import aggregation_error
from fedlora.strategies.conformance import SimulatedClient, simulate_round
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.ffa_lora import FfaLora
from fedlora.strategies.flora import Flora
from fedlora.strategies.lora_fair import LoraFair, ridge_correction
from tests.helpers import random_state


def _make(cls, ranks, seed=0, alpha=16.0, **extra):
    r_max = max(ranks)
    settings = parse_settings(cls.Settings, extra, cls.name)
    strategy = cls(LoraSpec(r_max, alpha, ("q", "v")), seed=seed, settings=settings)
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
    ranks = list(ranks) * len(n) if len(ranks) == 1 else ranks
    clients = [
        SimulatedClient(i, int(n_i), r) for i, (n_i, r) in enumerate(zip(n, ranks, strict=True))
    ]
    updates, rejected = simulate_round(strategy, 1, current, clients, rng)
    assert not rejected
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
    plan = strategy.client_plan(1, 0, 4)
    assert plan.freeze_a and plan.a_from_seed and not plan.send_a
    payload = strategy.payload(1, 0, plan, current)
    assert not any(k.endswith("lora_A.weight") for k in payload)
    assert payload["m.q.lora_B.weight"].shape == (6, 4)
    reply, _ = SimulatedClient(0, 5, rank=4).train(strategy, plan, payload, current, rng)
    assert not any(k.endswith("lora_A.weight") for k in reply)
    with pytest.raises(ValueError, match="must never be sent"):
        strategy.decode_update(1, plan, {**reply, "m.q.lora_A.weight": np.zeros((4, 5))}, current)


def test_fedavg_with_mixed_ranks_is_inexact_but_measured():
    _, _, updates, w, out = _round(FedAvg, (4, 8, 16), n=(10, 20, 30))
    e = aggregation_error(updates, w, out)
    assert e > 1e-3
    assert np.isclose(e, _direct(updates, w, out), rtol=1e-5)


def test_lora_fair_never_worse_than_fedavg_and_reports_floor():
    strategy, current, updates, w, out = _round(LoraFair, (8, 8, 8, 8), n=(5, 10, 20, 40))
    e_fair = aggregation_error(updates, w, out)
    extra = strategy.extra_round_metrics(updates, w, None, out)
    assert e_fair <= extra["fedavg-error"] + 1e-9
    assert extra["fair-floor"] <= e_fair + 1e-6
    assert e_fair < extra["fedavg-error"]  # the correction helps on random clients
    assert np.isclose(extra["fair-error"], e_fair, rtol=1e-6, atol=1e-9)
    # the recorded e(FedAvg) is the base class's error of a plain FedAvg of the same round
    fedavg = _make(FedAvg, (8, 8, 8, 8))[0].aggregate(1, updates, w, current)
    assert np.isclose(extra["fedavg-error"], aggregation_error(updates, w, fedavg), rtol=1e-6)
    # the floor against dense matrices: the ideal product outside the row space of A_bar
    num = den = 0.0
    for m, f in fedavg.factors.items():
        ideal = sum(
            wk * u.state.scaling * u.state.factors[m].b.astype(np.float64) @ u.state.factors[m].a
            for u, wk in zip(updates, w, strict=True)
        )
        a = f.a.astype(np.float64)
        num += np.sum((ideal - ideal @ a.T @ np.linalg.pinv(a @ a.T) @ a) ** 2)
        den += np.sum(ideal**2)
    assert np.isclose(extra["fair-floor"], np.sqrt(num / den), rtol=1e-6, atol=1e-7)


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


def test_the_server_refuses_ranks_the_strategy_cannot_take():
    from fedlora.server.nodes import NodeRegistry

    registry = NodeRegistry(8, mixed_ranks=LoraFair.heterogeneous_ranks)
    registry.register(5, 4)
    assert 5 in registry.excluded and "heterogeneous" in registry.excluded[5]
    registry.register(6, 99)
    assert "outside [1, lora-rank=8]" in registry.excluded[6]


STRATEGIES = [FedAvg, FfaLora, LoraFair, Flora]


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
        assert f.a.shape[1] == current.factors[m].a.shape[1]
        assert f.b.shape[0] == current.factors[m].b.shape[0]
        if cls is not Flora:  # FLoRA's stack has rank sum(r_k)
            assert f.a.shape == current.factors[m].a.shape
    e = aggregation_error(updates, w, out)
    assert np.isclose(e, _direct(updates, w, out), rtol=1e-4, atol=1e-6)
    if cls.exact:
        assert e < 1e-5
    if len(ranks) == 1 and cls is not FfaLora:
        assert e < 1e-5  # a single client is reproduced exactly


# --------------------------------------------------------------------------- #
# FLoRA                                                                        #
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("ranks", [(8, 8, 8), (4, 8, 16), (1, 3, 16, 2)])
def test_flora_stacking_is_exact_for_mixed_ranks(ranks):
    _, _, updates, w, out = _round(Flora, ranks, n=range(3, 3 + 5 * len(ranks), 5))
    assert out.rank == sum(ranks)
    assert _direct(updates, w, out) < 1e-6


def _flora_run(catch_up, rounds=4, n_nodes=5, per_round=2, seed=0):
    ranks = [4, 8, 4, 16, 8][:n_nodes]
    strategy, current, rng = _make(Flora, ranks, seed, **{"flora-catch-up": str(catch_up)})
    clients = [SimulatedClient(i, 10 + i, r) for i, r in enumerate(ranks)]
    sampler = np.random.default_rng(seed)
    rejected_total = {}
    for r in range(1, rounds + 1):
        chosen = sorted(sampler.choice(n_nodes, size=per_round, replace=False))
        updates, rejected = simulate_round(strategy, r, current, [clients[i] for i in chosen], rng)
        rejected_total.update({(r, k): v for k, v in rejected.items()})
        if updates:
            w = np.array([u.num_examples for u in updates], float)
            current = strategy.aggregate(r, updates, w / w.sum(), current)
    # a final round in which every node catches up (or not) to the server's base
    for c in clients:
        plan = strategy.client_plan(rounds + 1, c.node_id, c.rank)
        payload = strategy.payload(rounds + 1, c.node_id, plan, current)
        c.base = c.base.merged(payload, plan.merge_rounds, strategy.scaling, reset=plan.reset_base)
    server = strategy.base_delta()
    diffs = [
        max(float(np.max(np.abs(c.base.delta.get(m, 0) - server[m]))) for m in server)
        for c in clients
    ]
    return diffs, rejected_total, strategy


def test_flora_catch_up_keeps_every_node_base_equal_to_server():
    diffs, rejected, strategy = _flora_run(catch_up=True)
    assert max(diffs) == 0.0  # the same merge function in the same order: bit-identical
    assert not rejected
    assert strategy.ledger.merged_round == 4


def test_flora_without_catch_up_nodes_drift_and_are_rejected():
    diffs, rejected, _ = _flora_run(catch_up=False)
    assert max(diffs) > 1e-3
    assert any("merged up to round" in v or "fingerprint" in v for v in rejected.values())


def test_flora_state_round_trip_restores_merged_base():
    _, _, strategy = _flora_run(catch_up=True)
    clone = Flora(strategy.lora, seed=strategy.seed, settings=strategy.settings)
    clone.load_state_dict(strategy.state_dict())
    assert clone.ledger.merged_round == strategy.ledger.merged_round
    for m, d in strategy.base_delta().items():
        np.testing.assert_array_equal(clone.base_delta()[m], d)
    assert clone.ledger.node_last_merged == strategy.ledger.node_last_merged


def test_truncated_svd_error_matches_discarded_singular_values():
    from fedlora.lora.lowrank import truncated_svd

    rng = np.random.default_rng(0)
    d = rng.normal(size=(12, 3)) @ rng.normal(size=(3, 10)) + 0.01 * rng.normal(size=(12, 10))
    b, a, err = truncated_svd(d, 3)
    direct = np.linalg.norm(d - b.astype(np.float64) @ a) / np.linalg.norm(d)
    assert np.isclose(err, direct, rtol=1e-4) and err < 0.05
    b, a, err = truncated_svd(d, 20)  # asking more than the matrix has: exact, padded
    assert b.shape == (12, 20) and err < 1e-12
