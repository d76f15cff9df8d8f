"""RoLoRA, FedSVD, FlexLoRA, FedRot-LoRA and FedEx-LoRA against independent numpy references.

Each rule is checked on materialised d_out x d_in products (numpy's own SVD, scipy's
orthogonal Procrustes), not on the factored forms the strategies compute with.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes

from fedlora.lora.lowrank import lowrank_svd, procrustes_rotation
from fedlora.lora.plan import PLAN_VERSION, ClientPlan, align_to
from fedlora.strategies.conformance import SimulatedClient, assert_conforms, simulate_round
from fedlora.strategies.fedex_lora import FedExLora
from fedlora.strategies.fedrot_lora import FedRotLora
from fedlora.strategies.fedsvd import FedSvd
from fedlora.strategies.flexlora import FlexLora
from fedlora.strategies.rolora import RoLora
from tests.strategies.test_builtins import _direct, _make, _round


def _product(state, module):
    f = state.factors[module]
    return state.scaling * f.b.astype(np.float64) @ f.a.astype(np.float64)


@pytest.mark.parametrize("cls", [RoLora, FedSvd, FlexLora, FedRotLora, FedExLora])
def test_conforms(cls):
    assert_conforms(cls)


def test_rolora_averages_b_on_odd_rounds_and_a_on_even_rounds_exactly():
    for server_round in (1, 2):
        strategy, current, rng = _make(RoLora, [4], seed=server_round)
        clients = [SimulatedClient(i, n, 4) for i, n in enumerate([10, 30, 60])]
        updates, rejected = simulate_round(strategy, server_round, current, clients, rng)
        assert not rejected
        w = np.array([10, 30, 60]) / 100
        out = strategy.aggregate(server_round, updates, w, current)
        trained, frozen = ("b", "a") if server_round == 1 else ("a", "b")
        for m, f in out.factors.items():
            want = sum(
                wk * getattr(u.state.factors[m], trained) for u, wk in zip(updates, w, strict=True)
            )
            np.testing.assert_allclose(getattr(f, trained), want, atol=1e-5)
            np.testing.assert_array_equal(getattr(f, frozen), getattr(current.factors[m], frozen))
            assert not np.allclose(getattr(f, trained), getattr(current.factors[m], trained))
        assert _direct(updates, w, out) < 1e-5  # exact on materialised products, both rounds
    b_plan, a_plan = strategy.client_plan(1, 0, 4), strategy.client_plan(2, 0, 4)
    assert b_plan.freeze_a and not b_plan.send_a and b_plan.send_b
    assert a_plan.freeze_b and not a_plan.send_b and a_plan.send_a


def test_fedsvd_refactorises_the_averaged_product_with_orthonormal_rows():
    _, current, updates, w, out = _round(FedSvd, [4], [10, 30, 60])
    for m, f in out.factors.items():
        a0 = current.factors[m].a.astype(np.float64)
        np.testing.assert_allclose(a0 @ a0.T, np.eye(4), atol=1e-5)  # initial_state's A
        b_bar = sum(
            wk * u.state.factors[m].b.astype(np.float64) for u, wk in zip(updates, w, strict=True)
        )
        np.testing.assert_allclose(_product(out, m), current.scaling * b_bar @ a0, atol=1e-4)
        a = f.a.astype(np.float64)
        np.testing.assert_allclose(a @ a.T, np.eye(4), atol=1e-5)
        # A' is the right singular basis of the product: B'^T B' is diagonal
        gram = f.b.astype(np.float64).T @ f.b.astype(np.float64)
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-3)
    assert _direct(updates, w, out) < 1e-5


def test_flexlora_is_the_best_rank_r_approximation_of_the_weighted_update():
    _, current, updates, w, out = _round(FlexLora, [2, 4, 8], [10, 30, 60])
    for m in out.factors:
        ideal = sum(
            wk
            * u.state.scaling
            * u.state.factors[m].b.astype(np.float64)
            @ u.state.factors[m].a.astype(np.float64)
            for u, wk in zip(updates, w, strict=True)
        )
        s_ideal = np.linalg.svd(ideal, compute_uv=False)
        s_got = np.linalg.svd(_product(out, m), compute_uv=False)
        r = min(current.rank, len(s_ideal))
        np.testing.assert_allclose(s_got[:r], s_ideal[:r], rtol=1e-4)  # Eckart-Young
        u, s, vt = np.linalg.svd(ideal)
        best = (u[:, :r] * s[:r]) @ vt[:r]
        np.testing.assert_allclose(_product(out, m), best, atol=1e-4)


def test_lowrank_svd_matches_numpys_svd_of_the_materialised_sum():
    rng = np.random.default_rng(5)
    terms = [
        (c, rng.standard_normal((9, 3)), rng.standard_normal((3, 7))) for c in (0.2, -1.0, 0.7)
    ]
    dense = sum(c * b @ a for c, b, a in terms)
    for rank in (2, 5, 9):
        b, a, err = lowrank_svd(terms, rank)
        u, s, vt = np.linalg.svd(dense)
        k = min(rank, len(s))
        np.testing.assert_allclose(b @ a, (u[:, :k] * s[:k]) @ vt[:k], atol=1e-4)
        assert err == pytest.approx(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2)), abs=1e-6)


def test_procrustes_rotation_matches_scipy_and_keeps_each_clients_update():
    rng = np.random.default_rng(6)
    a_k, a_ref = rng.standard_normal((4, 11)), rng.standard_normal((4, 11))
    rot = procrustes_rotation(a_k, a_ref)
    scipy_r, _ = orthogonal_procrustes(a_k.T, a_ref.T)  # min ||a_k^T R - a_ref^T||
    np.testing.assert_allclose(rot, scipy_r.T, atol=1e-8)
    np.testing.assert_allclose(rot @ rot.T, np.eye(4), atol=1e-10)
    b_k = rng.standard_normal((6, 4)).astype(np.float32)
    trained = {"m.lora_A.weight": a_k.astype(np.float32), "m.lora_B.weight": b_k}
    aligned = align_to(trained, {"m.lora_A.weight": a_ref.astype(np.float32)})
    np.testing.assert_allclose(
        aligned["m.lora_B.weight"] @ aligned["m.lora_A.weight"], b_k @ a_k, atol=1e-4
    )
    before = np.linalg.norm(a_k - a_ref)
    after = np.linalg.norm(aligned["m.lora_A.weight"] - a_ref)
    assert after < before
    for _ in range(20):  # no other rotation brings A closer
        q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
        assert np.linalg.norm(q @ a_k - a_ref) >= after - 1e-5


def test_aligning_b_matches_scipy_and_keeps_each_clients_update():
    """The authors' other alignment: R minimises ||B_k R^T - B_received|| (scipy's
    orthogonal_procrustes(B_k, B_ref) gives that R^T), and B_k A_k stays as trained."""
    rng = np.random.default_rng(7)
    a_k = rng.standard_normal((4, 11)).astype(np.float32)
    b_k, b_ref = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    trained = {"m.lora_A.weight": a_k, "m.lora_B.weight": b_k.astype(np.float32)}
    received = {"m.lora_B.weight": b_ref.astype(np.float32)}
    aligned = align_to(trained, received, "b")
    want_rt, _ = orthogonal_procrustes(b_k, b_ref)  # min ||b_k R' - b_ref||, R' = R^T
    np.testing.assert_allclose(aligned["m.lora_B.weight"], b_k @ want_rt, atol=1e-5)
    np.testing.assert_allclose(aligned["m.lora_A.weight"], want_rt.T @ a_k, atol=1e-5)
    np.testing.assert_allclose(
        aligned["m.lora_B.weight"] @ aligned["m.lora_A.weight"], b_k @ a_k, atol=1e-4
    )
    assert align_to(trained, {}, "b") == trained  # nothing received: nothing to align to
    with pytest.raises(ValueError, match="'c'"):
        align_to(trained, received, "c")
    with pytest.raises(ValueError, match="align_factor"):
        ClientPlan(rank=4, align_rotation=True, align_factor="c")


def test_fedrot_lora_alternates_as_its_authors_code_when_asked():
    from fedlora.lora.spec import LoraSpec

    spec = LoraSpec(4, 8.0, ("q", "v"))
    plans = [FedRotLora(spec).client_plan(r, 0, 4) for r in (1, 2, 3)]
    assert all(p.align_rotation and p.align_factor == "a" for p in plans)  # the default
    alt = FedRotLora(spec, settings=FedRotLora.Settings(alignment="alternate"))
    plans = [alt.client_plan(r, 0, 4) for r in (1, 2, 3, 4, 5)]
    assert [p.align_rotation for p in plans] == [False, True, True, True, True]
    assert [p.align_factor for p in plans[1:]] == ["a", "b", "a", "b"]
    with pytest.raises(ValueError, match="'alignment': 'b'"):
        FedRotLora.Settings(alignment="b")


def test_fedrot_lora_clients_align_and_the_server_averages():
    strategy, _, updates, w, out = _round(FedRotLora, [4], [10, 30, 60])
    assert strategy.client_plan(1, 0, 4).align_rotation
    for m, f in out.factors.items():
        want_a = sum(wk * u.state.factors[m].a for u, wk in zip(updates, w, strict=True))
        np.testing.assert_allclose(f.a, want_a, atol=1e-5)


def test_plans_carry_the_new_fields_and_refuse_freezing_both_factors():
    plan = ClientPlan(rank=4, freeze_b=True, send_b=False, align_rotation=True)
    assert ClientPlan.from_json(plan.to_json()) == plan
    assert f'"version": {PLAN_VERSION}' in plan.to_json() and PLAN_VERSION == 5
    assert not plan.trains("m.lora_B.weight") and plan.trains("m.lora_A.weight")
    reply = plan.reply({"m.lora_A.weight": np.ones((4, 3)), "m.lora_B.weight": np.ones((2, 4))})
    assert list(reply) == ["m.lora_A.weight"]
    with pytest.raises(ValueError, match="freezes both"):
        ClientPlan(rank=4, freeze_a=True, freeze_b=True)


def test_fedex_lora_base_residual_plus_adapter_is_the_exact_average():
    strategy, current, updates, w, out = _round(FedExLora, [4], [10, 30, 60])
    assert strategy.extra_round_metrics(updates, w, current, out)["exact-error"] < 1e-6
    for m, f in out.factors.items():
        want_a = sum(wk * u.state.factors[m].a for u, wk in zip(updates, w, strict=True))
        np.testing.assert_allclose(f.a, want_a, atol=1e-5)  # the adapter is FedAvg's
    strategy.ledger.sync(2)  # the base every node holds before round 2
    for m in out.factors:
        ideal = sum(
            wk
            * u.state.scaling
            * u.state.factors[m].b.astype(np.float64)
            @ u.state.factors[m].a.astype(np.float64)
            for u, wk in zip(updates, w, strict=True)
        )
        np.testing.assert_allclose(strategy.base_delta()[m] + _product(out, m), ideal, atol=1e-4)


def test_fedex_lora_a_node_that_missed_a_round_catches_up_on_its_residual():
    strategy, current, rng = _make(FedExLora, [4])
    clients = [SimulatedClient(i, n, 4) for i, n in enumerate([10, 30, 60])]
    for server_round, chosen in ((1, clients[:2]), (2, clients[1:]), (3, clients)):
        updates, rejected = simulate_round(strategy, server_round, current, chosen, rng)
        assert not rejected, rejected  # every base agrees with the server's
        n = np.array([u.num_examples for u in updates], float)
        current = strategy.aggregate(server_round, updates, n / n.sum(), current)
    assert strategy.client_plan(4, 0, 4).merge_rounds == (3,)  # node 0 merged 1 and 2 in round 3
