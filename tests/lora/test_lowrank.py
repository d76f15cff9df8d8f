"""FedAvg and the aggregation error against independent numpy references."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.lora.lowrank import ProductSum, relative_error, sum_sq_norm
from fedlora.lora.state import LoraFactors, resize_rank
from fedlora.strategies.api import ClientPlan, ClientUpdate, aggregation_error
from fedlora.strategies.fedavg import fedavg_states
from tests.helpers import random_state


def _dense_product(state, module):
    f = state.factors[module]
    return state.scaling * f.b.astype(np.float64) @ f.a.astype(np.float64)


def test_fedavg_matches_numpy_weighted_average():
    rng = np.random.default_rng(1)
    states = [random_state(rng, rank=4) for _ in range(3)]
    n = np.array([10.0, 30.0, 60.0])
    p = n / n.sum()
    out = fedavg_states(states, p, rank=4, scaling=2.0)
    for m in states[0].factors:
        want_a = np.average([s.factors[m].a for s in states], axis=0, weights=n)
        want_b = np.average([s.factors[m].b for s in states], axis=0, weights=n)
        np.testing.assert_allclose(out.factors[m].a, want_a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out.factors[m].b, want_b, rtol=1e-6, atol=1e-6)
    for k in states[0].dense:
        want = np.average([s.dense[k] for s in states], axis=0, weights=n)
        np.testing.assert_allclose(out.dense[k], want, rtol=1e-6, atol=1e-6)


def test_fedavg_does_not_mutate_inputs():
    rng = np.random.default_rng(2)
    states = [random_state(rng, rank=3) for _ in range(2)]
    before = [{k: v.copy() for k, v in s.to_state_dict().items()} for s in states]
    fedavg_states(states, [0.5, 0.5], rank=3, scaling=2.0)
    for s, b in zip(states, before, strict=True):
        for k, v in s.to_state_dict().items():
            np.testing.assert_array_equal(v, b[k])


def test_sum_sq_norm_matches_materialised_product():
    rng = np.random.default_rng(3)
    terms = [(rng.normal(), rng.normal(size=(9, r)), rng.normal(size=(r, 11))) for r in (1, 3, 5)]
    dense = sum(c * b @ a for c, b, a in terms)
    assert np.isclose(sum_sq_norm(terms), np.sum(dense**2), rtol=1e-10)


def _updates(states, ranks=None):
    return [ClientUpdate(i, 10, s, {}, ClientPlan(rank=s.rank)) for i, s in enumerate(states)]


def test_aggregation_error_matches_direct_products():
    rng = np.random.default_rng(4)
    states = [random_state(rng, rank=4) for _ in range(4)]
    p = np.array([0.1, 0.2, 0.3, 0.4])
    out = fedavg_states(states, p, rank=4, scaling=2.0)
    num = den = 0.0
    for m in out.factors:
        ideal = sum(w * _dense_product(s, m) for s, w in zip(states, p, strict=True))
        num += np.sum((ideal - _dense_product(out, m)) ** 2)
        den += np.sum(ideal**2)
    want = np.sqrt(num / den)
    got = aggregation_error(_updates(states), p, out)
    assert want > 1e-3  # FedAvg of factors is inexact for differing clients
    assert np.isclose(got, want, rtol=1e-6)


def test_identical_clients_give_zero_error():
    rng = np.random.default_rng(5)
    state = random_state(rng, rank=4)
    out = fedavg_states([state, state, state], [0.2, 0.3, 0.5], rank=4, scaling=2.0)
    assert aggregation_error(_updates([state] * 3), [0.2, 0.3, 0.5], out) < 1e-6


def test_relative_error_of_zero_target_is_zero():
    z = np.zeros((3, 2))
    assert relative_error([[(1.0, z, z.T)]], [[(1.0, z, z.T)]]) == 0.0


def test_resize_rank_pads_exactly_and_truncates():
    rng = np.random.default_rng(6)
    f = LoraFactors(
        rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    )
    up = resize_rank(f, 6)
    np.testing.assert_allclose(up.b @ up.a, f.b @ f.a, rtol=1e-6)
    down = resize_rank(f, 2)
    assert down.a.shape == (2, 5) and down.b.shape == (4, 2)
    np.testing.assert_array_equal(down.a, f.a[:2])


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 5),
    rank=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    weights=st.lists(st.floats(0.0, 10.0), min_size=5, max_size=5),
)
def test_fedavg_property_random_inputs(k, rank, seed, weights):
    rng = np.random.default_rng(seed)
    states = [random_state(rng, rank=rank) for _ in range(k)]
    w = np.array(weights[:k]) + 1e-3
    p = w / w.sum()
    out = fedavg_states(states, p, rank=rank, scaling=2.0)
    for m in out.factors:
        ref_a = sum(pi * s.factors[m].a.astype(np.float64) for pi, s in zip(p, states, strict=True))
        np.testing.assert_allclose(out.factors[m].a, ref_a, rtol=1e-5, atol=1e-5)
        assert out.factors[m].a.dtype == np.float32
    err = aggregation_error(_updates(states), p, out)
    assert 0.0 <= err < np.inf
    if k == 1:
        assert err < 1e-5


def _random_terms(rng, n, d_out, d_in, ranks):
    return [
        (float(rng.uniform(-1, 1)), rng.normal(size=(d_out, r)), rng.normal(size=(r, d_in)))
        for r in ranks[:n]
    ]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), d_out=st.integers(1, 9))
def test_product_sum_against_dense_numpy(seed, n, d_out):
    """<T, S>, ||T - S|| and the part of T outside a row space, against dense matrices."""
    rng = np.random.default_rng(seed)
    d_in = int(rng.integers(1, 9))
    ranks = [int(r) for r in rng.integers(1, 5, size=5)]
    t_terms = _random_terms(rng, n, d_out, d_in, ranks)
    s_terms = _random_terms(rng, 2, d_out, d_in, ranks)
    t = sum(c * b @ a for c, b, a in t_terms)
    s = sum(c * b @ a for c, b, a in s_terms)
    target = ProductSum(t_terms)
    scale = max(np.sum(t**2) + np.sum(s**2), 1e-12)
    assert np.isclose(target.sq_norm, np.sum(t**2), rtol=1e-9, atol=1e-9 * scale)
    assert np.isclose(target.inner(s_terms), np.sum(t * s), rtol=1e-9, atol=1e-9 * scale)
    assert np.isclose(target.distance_sq(s_terms), np.sum((t - s) ** 2), atol=1e-9 * scale)
    a = rng.normal(size=(int(rng.integers(1, 4)), d_in))
    projector = a.T @ np.linalg.pinv(a @ a.T) @ a
    want = np.sum((t - t @ projector) ** 2)
    assert np.isclose(target.outside_rows_sq(a), want, atol=1e-8 * scale)


def test_weighted_average_of_many_clients_within_its_error_bound():
    from fedlora.strategies.api import weighted_average

    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((64, 16)).astype(np.float32) for _ in range(100)]
    w = rng.random(100)
    w /= w.sum()
    exact = sum(wk * x.astype(np.float64) for wk, x in zip(w, xs, strict=True))
    got = weighted_average(xs, w)
    assert got.dtype == np.float32
    # one float32 rounding per product, then one for the result
    magnitude = sum(wk * np.abs(x.astype(np.float64)) for wk, x in zip(w, xs, strict=True))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got - exact) <= 2.0**-24 * magnitude + ulp)
