"""SecAgg+ as pure functions: the secure sum equals the plain weighted sum, dropouts included.

Every node runs the real protocol state (:class:`NodeSecAgg`, Flower's key agreement,
Shamir shares and encryption); the "server" here is the routing the tests do by hand,
the same routing ``fedlora.server.secure_aggregation`` does over messages.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.secagg.protocol import (
    NodeSecAgg,
    SecAggError,
    SecAggParams,
    flatten,
    masked_sum,
    neighbourhoods,
    prg,
    unflatten,
    unmask,
)

SHAPES = {"m.lora_A.weight": (4, 16), "m.lora_B.weight": (16, 4), "head.weight": (3, 16)}


def _updates(num: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(num)
    ]


def run_protocol(
    inputs: dict[int, np.ndarray],
    params: SecAggParams,
    *,
    drop_before_mask: frozenset[int] = frozenset(),
    drop_after_mask: frozenset[int] = frozenset(),
) -> tuple[np.ndarray, float, dict[int, np.ndarray]]:
    """The four stages over in-process nodes; returns (sum, weight sum, masked inputs)."""
    nodes = sorted(inputs)
    hoods = neighbourhoods(nodes, params.num_shares, seed=1)
    states, keys = {}, {}
    for n in nodes:
        states[n], pk1, pk2 = NodeSecAgg.setup(n, 3, params)
        keys[n] = (pk1, pk2)
    inbox: dict[int, dict[int, bytes]] = {n: {} for n in nodes}
    for n in nodes:
        for dst, ciphertext in states[n].share_keys(3, {j: keys[j] for j in hoods[n]}).items():
            inbox[dst][n] = ciphertext
    masked = {}
    for n in nodes:
        if n in drop_before_mask:
            continue
        masked[n], _ = states[n].mask(3, inbox[n], inputs[n])
    survivors = sorted(masked)
    dropped = sorted(set(nodes) - set(survivors))
    shares: dict[int, list[bytes]] = {n: [] for n in nodes}
    for n in survivors:
        if n in drop_after_mask:
            continue  # sent its masked input, then vanished: the others' shares unmask it
        revealed = states[n].reveal(
            3, [j for j in hoods[n] if j in survivors], [j for j in hoods[n] if j in dropped]
        )
        for owner, share in revealed.items():
            shares[owner].append(share)
    total = masked_sum(list(masked.values()), params.modulus)
    summed, weight = unmask(
        total,
        params,
        survivors=survivors,
        dropped=dropped,
        shares=shares,
        neighbours=hoods,
        public_keys=keys,
    )
    return summed, weight, masked


@pytest.mark.parametrize(
    ("num", "shares", "before", "after"),
    [
        (4, 4, (), ()),
        (5, 5, (), (2,)),  # a dropout after the masking stage
        (5, 5, (4,), ()),  # a dropout before it: its pairwise masks are rebuilt
        (7, 5, (1,), (6,)),  # SecAgg+ ring neighbourhoods, both kinds of dropout
    ],
)
def test_secure_weighted_mean_equals_the_plain_one(num, shares, before, after):
    params = SecAggParams(num_shares=shares, threshold=shares // 2 + 1)
    ups = _updates(num)
    weights = np.random.default_rng(5).dirichlet(np.ones(num))
    inputs = {10 + i: flatten(u, w) for i, (u, w) in enumerate(zip(ups, weights, strict=True))}
    drop_before = frozenset(10 + i for i in before)
    summed, weight, _ = run_protocol(
        inputs,
        params,
        drop_before_mask=drop_before,
        drop_after_mask=frozenset(10 + i for i in after),
    )
    took_part = [i for i in range(num) if 10 + i not in drop_before]
    w = weights[took_part]
    assert weight == pytest.approx(w.sum(), abs=len(took_part) * params.step)
    mean = unflatten(summed / weight, SHAPES)
    for key in SHAPES:  # an independent reference: the plain weighted mean in float64
        reference = sum(
            w_k * ups[i][key].astype(np.float64) for i, w_k in zip(took_part, w, strict=True)
        )
        reference /= w.sum()
        # each node's stochastic rounding is below one step; the division by sum w scales it
        bound = len(took_part) * params.step / w.sum() * 2
        np.testing.assert_allclose(mean[key], reference, atol=bound, rtol=0)


def test_the_masks_are_needed():
    """Without unmasking, the sum is noise: the masks do not cancel on their own."""
    params = SecAggParams(num_shares=4, threshold=3)
    inputs = {i: flatten(u, 0.25) for i, u in enumerate(_updates(4), start=1)}
    summed, _, masked = run_protocol(inputs, params)
    plain = masked_sum(list(masked.values()), params.modulus)
    naive = plain[:-1] * params.step - 4 * params.clipping_range  # dequantised, masks kept
    assert np.abs(summed).max() < 2.0
    assert np.mean(np.abs(naive - summed) > 1.0) > 0.9


def test_one_masked_input_is_indistinguishable_from_uniform():
    """What the server receives from one node has no correlation with that node's update."""
    params = SecAggParams(num_shares=4, threshold=3)
    ups = _updates(4, seed=3)
    inputs = {i: flatten(u, 0.25) for i, u in enumerate(ups, start=1)}
    _, _, masked = run_protocol(inputs, params)
    seen = masked[1].astype(np.float64)
    truth = inputs[1]
    n = seen.size
    # uniform on [0, M): mean M/2, sd M/sqrt(12)
    m = params.modulus
    assert abs(seen.mean() - m / 2) < 4 * m / np.sqrt(12 * n)
    corr = np.corrcoef(seen, truth)[0, 1]
    assert abs(corr) < 4 / np.sqrt(n)  # chance level: |r| ~ 1/sqrt(n)
    # and its quantised form is far from uniform, so the test can tell the two apart
    quantised = (np.clip(truth, -8, 8) + 8) / params.step
    assert abs(np.corrcoef(quantised, truth)[0, 1]) > 0.99


def test_too_few_survivors_fail_with_the_reason():
    params = SecAggParams(num_shares=5, threshold=3)
    inputs = {i: flatten(u, 0.2) for i, u in enumerate(_updates(5), start=1)}
    with pytest.raises(SecAggError, match="threshold"):
        run_protocol(inputs, params, drop_after_mask=frozenset({1, 2, 3}))


def test_a_node_never_reveals_both_secrets_of_one_neighbour():
    params = SecAggParams(num_shares=3, threshold=2)
    state, pk1, pk2 = NodeSecAgg.setup(1, 1, params)
    others = {j: NodeSecAgg.setup(j, 1, params)[1:] for j in (2, 3)}
    state.share_keys(1, {1: (pk1, pk2), **others})
    state.stage = "collect-masked"
    with pytest.raises(SecAggError, match="both secrets"):
        state.reveal(1, [2, 3], [2])


def test_stages_out_of_order_are_refused():
    state, pk1, pk2 = NodeSecAgg.setup(1, 1, SecAggParams(num_shares=3, threshold=2))
    with pytest.raises(SecAggError, match="expected after"):
        state.mask(1, {}, np.zeros(3))
    with pytest.raises(SecAggError, match="round 2"):
        state.share_keys(2, {1: (pk1, pk2)})


@pytest.mark.parametrize(
    ("params", "nodes", "match"),
    [
        (SecAggParams(num_shares=4, threshold=2), 4, "more than half"),
        (SecAggParams(num_shares=4, threshold=3), 6, "odd"),
        (SecAggParams(num_shares=3, threshold=2, modulus=1000), 3, "power of 2"),
        (SecAggParams(num_shares=3, threshold=2, quantization_range=1 << 31), 3, "wraps"),
        (SecAggParams(num_shares=3, threshold=2, clipping_range=0), 3, "clipping"),
    ],
)
def test_bad_settings_name_the_value(params, nodes, match):
    with pytest.raises(SecAggError, match=match):
        params.check(nodes)


def test_prg_is_uniform_and_keyed():
    a, b = prg(b"k" * 32, 100_000, 1 << 32), prg(b"l" * 32, 100_000, 1 << 32)
    assert np.array_equal(a, prg(b"k" * 32, 100_000, 1 << 32))
    assert not np.array_equal(a, b)
    assert abs(a.mean() / (1 << 32) - 0.5) < 0.01
    counts = np.bincount(prg(b"s" * 32, 80_000, 8), minlength=8)
    assert counts.min() > 9_000 and counts.max() < 11_000


def _three_shared(params: SecAggParams, extra: int = 0):
    """Node 1 after share-keys and masking with nodes 2 and 3 (plus ``extra`` more)."""
    ids = list(range(1, 4 + extra))
    states = {n: NodeSecAgg.setup(n, 1, params) for n in ids}
    keys = {n: (pk1, pk2) for n, (_, pk1, pk2) in states.items()}
    inbox: dict[int, dict[int, bytes]] = {n: {} for n in ids}
    for n, (state, _, _) in states.items():
        for dst, c in state.share_keys(1, keys).items():
            inbox[dst][n] = c
    node = states[1][0]
    node.mask(1, inbox[1], np.zeros(5))
    return node


def test_a_server_lying_about_dropouts_gets_refused():
    """The attack of naming one node the only survivor, to collect both of its secrets."""
    params = SecAggParams(num_shares=4, threshold=3)
    node = _three_shared(params, extra=1)
    with pytest.raises(SecAggError, match="not a survivor"):
        node.reveal(1, [2], [3, 4])  # "2 survived, you and the others dropped"
    node.stage = "collect-masked"
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        node.reveal(1, [1, 2], [3, 4])
    node.stage = "collect-masked"
    with pytest.raises(SecAggError, match="shared nothing with"):
        node.reveal(1, [1, 2, 3, 99], [])


def test_a_node_shares_only_with_a_majority_threshold_of_real_neighbours():
    """A server that hands a node more neighbours than num-shares, or a minority threshold."""
    params = SecAggParams(num_shares=3, threshold=2)
    states = {n: NodeSecAgg.setup(n, 1, params) for n in range(1, 7)}
    keys = {n: (pk1, pk2) for n, (_, pk1, pk2) in states.items()}
    with pytest.raises(SecAggError, match="outside"):
        states[1][0].share_keys(1, keys)  # 6 "neighbours" for 3 shares: t=2 of 6 is no majority
    with pytest.raises(SecAggError, match="more than half"):
        NodeSecAgg.setup(1, 1, SecAggParams(num_shares=3, threshold=1))
