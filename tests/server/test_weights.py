"""Client weights from claimed example counts: the bounds against a lying node."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.lora.spec import LoraSpec
from fedlora.server.weights import (
    Claim,
    WeightPolicy,
    bounded_counts,
    cap_shares,
    client_weights,
)
from fedlora.strategies.fedavg import FedAvg
from fedlora.wire import protocol
from fedlora.wire.records import from_arrayrecord, to_arrayrecord
from tests.helpers import FakeGrid, flower_strategy, random_state, reply


def _waterfill_reference(w: np.ndarray, cap: float) -> np.ndarray:
    """min(cap, t w_i) with t found by bisection so that the weights sum to 1."""
    cap = max(cap, 1 / len(w))
    lo, hi = 0.0, 1e12
    for _ in range(200):
        t = (lo + hi) / 2
        if np.minimum(cap, t * w).sum() < 1:
            lo = t
        else:
            hi = t
    return np.minimum(cap, hi * w)


@settings(max_examples=200, deadline=None)
@given(
    raw=st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=12),
    cap=st.floats(0.01, 1.0),
)
def test_share_cap_matches_a_bisection_reference(raw, cap):
    w = np.array(raw) / np.sum(raw)
    got = cap_shares(w, cap)
    want = _waterfill_reference(w, cap)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)
    assert got.sum() == pytest.approx(1.0)
    assert got.max() <= max(cap, 1 / len(w)) * (1 + 1e-9)


def test_share_cap_leaves_an_honest_round_alone():
    w = np.array([1101, 1184, 919, 1113], float)  # four default partitions
    np.testing.assert_array_equal(cap_shares(w / w.sum(), 0.5), w / w.sum())


def test_a_claim_over_the_declared_count_is_cut_to_it():
    counts, anomalies = bounded_counts([Claim(1, 100, 100), Claim(2, 5000, 120)], ratio=0)
    np.testing.assert_array_equal(counts, [100, 120])
    assert [a.node_id for a in anomalies] == [2] and "declared 120" in anomalies[0].reason


def test_a_claim_far_above_the_others_is_cut_to_the_ratio_of_their_median():
    claims = [Claim(1, 100), Claim(2, 120), Claim(3, 80), Claim(4, 10**9)]
    counts, anomalies = bounded_counts(claims, ratio=10)
    np.testing.assert_array_equal(counts, [100, 120, 80, 10 * 100])  # median of 100, 120, 80
    assert [(a.node_id, a.claimed, a.used) for a in anomalies] == [(4, 10**9, 1000.0)]


def test_uniform_weighting_still_reports_anomalies():
    weights, anomalies = client_weights(
        [Claim(1, 10), Claim(2, 10**9)], WeightPolicy("uniform", 1.0, 10.0)
    )
    np.testing.assert_array_equal(weights, [0.5, 0.5])
    assert len(anomalies) == 1


def test_policy_rejects_bad_bounds():
    with pytest.raises(ValueError, match="max-weight-share"):
        WeightPolicy(max_share=0)
    with pytest.raises(ValueError, match="max-claim-ratio"):
        WeightPolicy(max_claim_ratio=0.5)


# --------------------------------------------------------------------------- #
# A lying client through the Flower hooks                                      #
# --------------------------------------------------------------------------- #
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q", "v"))


def _round(options: dict, claims: dict[int, float], poison: int | None = None):
    """One FedAvg round where node ``poison`` sends a huge adapter; returns (strategy, global)."""
    rng = np.random.default_rng(0)
    strategy = flower_strategy(FedAvg, SPEC, **options)
    current = random_state(rng, rank=4, scaling=SPEC.scaling)
    arrays = to_arrayrecord(current.to_state_dict())
    from flwr.app import ConfigRecord

    config = ConfigRecord({protocol.RUN_CONFIG: "{}"})
    messages = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(1, arrays, config, FakeGrid(sorted(claims)))
    }
    tensors = {n: random_state(rng, rank=4).to_state_dict() for n in claims}
    if poison is not None:
        tensors[poison] = {k: np.full_like(v, 1000.0) for k, v in tensors[poison].items()}
    replies = [reply(messages[n], tensors[n], claims[n]) for n in sorted(claims)]
    out, _ = strategy.aggregate_train(1, replies)
    return strategy, from_arrayrecord(out), tensors


def test_a_lying_client_no_longer_owns_the_average():
    """Measured before the bounds: weight 0.999996, the global equal to its tensors."""
    claims = {1: 1100, 2: 1200, 3: 900, 4: 1e9}
    options = {"clients_per_round": 4, "min_replies": 2}
    strategy, result, tensors = _round(options, claims, poison=4)
    report = strategy.reports[1]
    weights = {o.node_id: o.weight for o in report.outcomes}
    assert weights[4] == pytest.approx(0.5)  # cut to 10x the median, then the share cap
    honest = np.array([1100, 1200, 900], float)
    np.testing.assert_allclose([weights[n] for n in (1, 2, 3)], 0.5 * honest / honest.sum())
    assert [(a.node_id, a.used) for a in report.anomalies] == [(4, 11000.0)]
    key = "m.q.lora_A.weight"
    want = sum(weights[n] * tensors[n][key] for n in claims)
    np.testing.assert_allclose(result[key], want, rtol=1e-5)
    assert not np.allclose(result[key], tensors[4][key], rtol=0.1)


def test_without_the_bounds_the_liar_owns_the_average():
    """The attack as reported, with every bound switched off (the test can fail)."""
    claims = {1: 1100, 2: 1200, 3: 900, 4: 1e9}
    options = {"clients_per_round": 4, "min_replies": 2, "max_share": 1.0, "max_claim_ratio": 0}
    strategy, result, tensors = _round(options, claims, poison=4)
    weights = {o.node_id: o.weight for o in strategy.reports[1].outcomes}
    assert weights[4] > 0.99999
    np.testing.assert_allclose(result["m.q.lora_A.weight"], tensors[4]["m.q.lora_A.weight"], 1e-4)


def test_a_claim_of_zero_examples_is_dropped_with_the_reason():
    claims = {1: 1100, 2: 0, 3: 900}
    strategy, _, _ = _round({"clients_per_round": 3}, claims)
    outcome = next(o for o in strategy.reports[1].outcomes if o.node_id == 2)
    assert outcome.status == "dropped" and "at least 1" in outcome.reason
