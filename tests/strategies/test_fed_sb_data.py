"""Fed-SB with LoRA-SB's data-aware bases: the initialisation, the calibration, the bases' trip.

The initialisation is checked against the best rank-r approximation of -lr sign(G) built
from numpy's SVD in the test (and, where sign(G) has rank 1, against the product itself);
the nodes' gradients against autograd on the plain transformers model (no peft) over all
the examples at once; the strategy on the conformance kit's simulated nodes.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedlora.config import ConfigError, RunConfig
from fedlora.lora.plan import ClientPlan
from fedlora.lora.spec import LoraSpec
from fedlora.lora.state import A_SUFFIX, B_SUFFIX, GRAD_SUFFIX, AdapterError
from fedlora.model.calibration import mean_base_gradients
from fedlora.model.models import build_lora_model
from fedlora.model.train import example_loader
from fedlora.run.registry import check_run_strategy
from fedlora.strategies.api import ClientUpdate
from fedlora.strategies.conformance import SimulatedClient, assert_conforms
from fedlora.strategies.fed_sb import FedSbData, core_of, lora_sb_init
from tests.strategies.test_builtins import _make

RANK = 4


def test_conforms():
    assert_conforms(FedSbData)


def _best_rank_r(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vt[:r]


def test_init_is_the_best_rank_r_approximation_of_the_first_adam_step():
    rng = np.random.default_rng(0)
    grad = rng.standard_normal((12, 9))
    lr, s = 0.01, 2.0
    a, b, core, energy = lora_sb_init(grad, 3, lr, s)
    step = -lr * np.sign(grad)
    got = s * b.astype(np.float64) @ core @ a
    np.testing.assert_allclose(got, _best_rank_r(step, 3), atol=1e-6)
    np.testing.assert_allclose(a @ a.T.astype(np.float64), np.eye(3), atol=1e-6)
    np.testing.assert_allclose(b.T.astype(np.float64) @ b, np.eye(3), atol=1e-6)
    sv = np.linalg.svd(np.sign(grad), compute_uv=False)
    assert energy == pytest.approx(np.sum(sv[:3] ** 2) / np.sum(sv**2), rel=1e-9)
    assert np.all(np.diag(core) >= 0) and np.count_nonzero(core - np.diag(np.diag(core))) == 0


def test_init_recovers_a_rank_one_sign_pattern_exactly():
    u, v = np.array([1.0, -2.0, 3.0, -0.5]), np.array([0.3, -1.0, 2.0])
    grad = np.outer(u, v)  # sign(G) = sign(u) sign(v)^T has rank 1
    a, b, core, energy = lora_sb_init(grad, 1, 0.1, 4.0)
    np.testing.assert_allclose(4.0 * b @ core @ a, -0.1 * np.sign(grad), atol=1e-6)
    assert energy == pytest.approx(1.0)


def test_init_lr_zero_starts_the_core_at_zero_and_a_bad_rank_fails():
    grad = np.random.default_rng(1).standard_normal((6, 5))
    a, b, core, _ = lora_sb_init(grad, 2, 0.0, 1.0)
    assert not core.any() and a.shape == (2, 5) and b.shape == (6, 2)
    with pytest.raises(AdapterError, match="rank 6"):
        lora_sb_init(grad, 6, 0.1, 1.0)


def _round(strategy, server_round, current, clients, rng):
    """Plan, payload, fake training and decoding for ``clients``; payloads kept."""
    updates, payloads = [], {}
    for c in clients:
        plan = strategy.client_plan(server_round, c.node_id, c.rank)
        payload = strategy.payload(server_round, c.node_id, plan, current)
        payloads[c.node_id] = payload
        reply, metrics = c.train(strategy, plan, payload, current, rng)
        state = strategy.decode_update(server_round, plan, reply, current)
        updates.append(ClientUpdate(c.node_id, c.num_examples, state, metrics, plan))
    return updates, payloads


def test_calibration_round_fixes_bases_from_the_weighted_mean_gradient():
    strategy, current, rng = _make(FedSbData, [RANK], alpha=8.0, **{"init-lr": "0.01"})
    clients = [SimulatedClient(i, n, RANK) for i, n in enumerate((10, 30))]
    updates, payloads = _round(strategy, 1, current, clients, rng)
    plan = updates[0].plan
    assert plan.calibrate == 64 and not plan.train_core
    assert all(set(p) == set(current.dense) for p in payloads.values())  # the head only
    weights = np.array([0.25, 0.75])
    out = strategy.aggregate(1, updates, weights, current)
    assert strategy.calibrated and 0 < strategy.energy <= 1
    s = current.scaling
    for m, f in out.factors.items():
        grad = sum(
            w * u.state.dense[m].astype(np.float64) for u, w in zip(updates, weights, strict=True)
        )
        want = _best_rank_r(-0.01 * np.sign(grad), RANK)
        np.testing.assert_allclose(s * f.b.astype(np.float64) @ f.a, want, atol=1e-5)
        a, basis = strategy.basis(m, RANK, f.a.shape[1], f.b.shape[0])
        np.testing.assert_array_equal(a, f.a)
        np.testing.assert_allclose(basis @ core_of(f.b, basis), f.b, atol=1e-6)  # b = B R
    assert out.dense.keys() == current.dense.keys()
    assert all(np.array_equal(out.dense[k], current.dense[k]) for k in out.dense)


def test_bases_go_to_each_node_once_and_again_after_it_failed_a_round():
    strategy, current, rng = _make(FedSbData, [RANK])
    nodes = [SimulatedClient(i, 10, RANK) for i in range(3)]
    ups, _ = _round(strategy, 1, current, nodes[:2], rng)
    current = strategy.aggregate(1, ups, np.full(2, 0.5), current)
    has = lambda p: any(k.endswith(A_SUFFIX) for k in p)  # noqa: E731

    ups, sent = _round(strategy, 2, current, nodes[:2], rng)
    assert all(has(p) for p in sent.values())  # nobody holds the new bases yet
    assert all(u.plan.train_core and u.plan.core_bases == strategy.fixed_id for u in ups)
    current = strategy.aggregate(2, ups, np.full(2, 0.5), current)

    ups, sent = _round(strategy, 3, current, nodes, rng)
    assert not has(sent[0]) and not has(sent[1]) and has(sent[2])  # node 2 is new
    assert all(k.endswith(".lora_R.weight") or k in current.dense for k in sent[0])
    # node 1's reply is lost: it may not have stored the bases, so it gets them again
    current = strategy.aggregate(3, [ups[0], ups[2]], np.full(2, 0.5), current)
    _, sent = _round(strategy, 4, current, nodes, rng)
    assert not has(sent[0]) and has(sent[1]) and not has(sent[2])


def test_a_node_without_the_bases_fails_and_a_restored_strategy_sends_them_again():
    strategy, current, rng = _make(FedSbData, [RANK])
    nodes = [SimulatedClient(i, 10, RANK) for i in range(2)]
    ups, _ = _round(strategy, 1, current, nodes, rng)
    current = strategy.aggregate(1, ups, np.full(2, 0.5), current)
    ups, _ = _round(strategy, 2, current, nodes, rng)
    current = strategy.aggregate(2, ups, np.full(2, 0.5), current)
    lost = SimulatedClient(0, 10, RANK)  # node 0 restarted without its store
    with pytest.raises(AdapterError, match="holds no fixed bases"):
        _round(strategy, 3, current, [lost], rng)
    clone = FedSbData(strategy.lora, seed=strategy.seed, settings=strategy.settings)
    clone.load_state_dict(copy.deepcopy(strategy.state_dict()))
    assert clone.fixed_id == strategy.fixed_id
    ups, sent = _round(clone, 3, current, [SimulatedClient(0, 10, RANK)], rng)
    assert any(k.endswith(B_SUFFIX) for k in sent[0])  # after a restore, everyone again


def test_decode_refuses_a_calibration_reply_of_the_wrong_shape_or_not_finite():
    strategy, current, _ = _make(FedSbData, [RANK])
    plan = strategy.client_plan(1, 0, RANK)
    shapes = plan.reply_shapes(current)
    good = {k: np.ones(v, np.float32) for k, v in shapes.items()}
    assert all(k.endswith(GRAD_SUFFIX) for k in shapes)
    strategy.decode_update(1, plan, good, current)
    key = next(iter(good))
    for bad, match in [
        ({**good, key: np.ones((2, 2), np.float32)}, "gradient"),
        ({**good, key: np.full(shapes[key], np.nan, np.float32)}, "finite"),
        ({**good, "head.weight": np.ones(3, np.float32)}, "other tensors"),
    ]:
        with pytest.raises(AdapterError, match=match):
            strategy.decode_update(1, plan, bad, current)


def test_plan_fields_check_each_other_and_a_node_reads_stored_bases():
    with pytest.raises(AdapterError, match="core_bases"):
        ClientPlan(rank=2, core_bases="x")
    with pytest.raises(AdapterError, match="calibrate"):
        ClientPlan(rank=2, calibrate=8)  # it would send lora_A and lora_B
    with pytest.raises(AdapterError, match=">= 0"):
        ClientPlan(rank=2, calibrate=-1, send_a=False, send_b=False)
    plan = ClientPlan(rank=2, train_core=True, send_a=False, send_b=False, core_bases="id1")
    assert ClientPlan.from_json(plan.to_json()) == plan
    bases = {"m" + A_SUFFIX: np.eye(2, 5, dtype=np.float32), "m" + B_SUFFIX: np.eye(6, 2)}
    assert plan.sent_bases(bases, {}, "").keys() == bases.keys()
    assert plan.sent_bases({}, bases, "id1").keys() == bases.keys()
    with pytest.raises(AdapterError, match="'id1'.*'id0'"):
        plan.sent_bases({}, bases, "id0")
    fresh = {
        "m" + A_SUFFIX: np.zeros((2, 5), np.float32),
        "m" + B_SUFFIX: np.zeros((6, 2), np.float32),
    }
    start = plan.start(fresh, {}, bases)
    np.testing.assert_array_equal(start["m" + A_SUFFIX], bases["m" + A_SUFFIX])
    assert not start["m.lora_R.weight"].any()
    with pytest.raises(AdapterError, match="lack"):
        plan.start({k: v for k, v in fresh.items()} | {"n" + A_SUFFIX: np.zeros((2, 3))}
                   | {"n" + B_SUFFIX: np.zeros((4, 2))}, {}, bases)  # fmt: skip


def test_node_gradients_match_autograd_on_the_plain_model(tiny_model):
    spec = LoraSpec(RANK, 8.0, ("query", "value"), dropout=0.0)
    model = build_lora_model(str(tiny_model), 20, spec, seed=0)
    plain = copy.deepcopy(model).merge_and_unload()  # B = 0: the same weights, no peft
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 100, (5, 12), generator=gen)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 20, (5,), generator=gen)
    batches = [(ids[:3], mask[:3], labels[:3]), (ids[3:], mask[3:], labels[3:])]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    grads, seen, loss = mean_base_gradients(model, batches)
    assert seen == 5 and len(grads) == 4  # 2 layers x (query, value)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # as before
    assert any("lora_A" in n for n in trainable)
    assert all(p.grad is None for p in model.parameters())  # nothing left for the optimiser
    plain.eval()
    plain.requires_grad_(True)  # peft froze the base; here every weight takes a gradient
    out = plain(input_ids=ids, attention_mask=mask)
    want_loss = torch.nn.functional.cross_entropy(out.logits, labels)
    want_loss.backward()
    assert loss == pytest.approx(want_loss.item(), rel=1e-5)
    for key, g in grads.items():
        name = key[: -len(GRAD_SUFFIX)].removeprefix("base_model.model.")
        ref = plain.get_submodule(name).weight.grad.numpy()
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-7)
        assert np.abs(ref).max() > 0


def test_node_gradients_of_gpt2_conv1d_layers_come_in_the_bases_layout():
    """GPT-2's Conv1D stores W as d_in x d_out (peft's fan_in_fan_out); the reply is
    d_out x d_in, as lora_B (d_out x r) and lora_A (r x d_in) need: autograd's W.grad^T."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedlora.model.train import batch_loss

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    lora = LoraConfig(r=RANK, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    model = get_peft_model(GPT2LMHeadModel(config), lora)
    ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2:, 7:] = 0  # padded tails, in the loss as their labels say
    labels = ids.masked_fill(mask == 0, -100)
    batches = [(ids[:1], mask[:1], labels[:1]), (ids[1:], mask[1:], labels[1:])]
    grads, seen, _ = mean_base_gradients(model, batches)
    reference = copy.deepcopy(model)
    reference.eval()
    bases = {n: m.get_base_layer() for n, m in reference.named_modules() if hasattr(m, "lora_A")}
    for layer in bases.values():
        layer.weight.requires_grad_(True)
    sum(
        batch_loss(reference, *(t[i:j] for t in (ids, mask, labels))) * (j - i)
        for i, j in ((0, 1), (1, 4))
    ).backward()
    assert seen == 4 and len(grads) == len(bases) == 2 * 3  # c_attn, attn and mlp c_proj
    for name, layer in bases.items():
        want = layer.weight.grad.numpy().T  # Conv1D: W is d_in x d_out
        got = grads[name + GRAD_SUFFIX]
        assert got.shape == (layer.nf, layer.weight.shape[0]) == want.shape
        np.testing.assert_allclose(got * seen, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize(("size", "count"), [(50, 20), (5, 12)])
def test_the_example_loader_draws_exactly_count_examples(size, count):
    data = TensorDataset(torch.arange(size), torch.ones(size), torch.zeros(size))
    batches = list(example_loader(data, 8, count, seed=1))
    drawn = torch.cat([b[0] for b in batches])
    assert len(drawn) == count and [len(b[0]) for b in batches][:-1] == [8] * (len(batches) - 1)
    assert len(set(drawn.tolist())) == min(size, count)  # repeats only when the node is small
    again = torch.cat([b[0] for b in example_loader(data, 8, count, seed=1)])
    assert torch.equal(drawn, again)
    with pytest.raises(ValueError, match="not 0"):
        example_loader(data, 8, 0, seed=1)


def test_dp_and_secure_aggregation_are_refused_before_any_process():
    with pytest.raises(ConfigError, match="'dp'.*fed_sb_data.*calibrates"):
        check_run_strategy(RunConfig(strategy="fed_sb_data", dp=True))
    assert check_run_strategy(RunConfig(strategy="fed_sb_data", base_quantization="4bit"))
    with pytest.raises(ConfigError, match="secure-aggregation"):
        check_run_strategy(RunConfig(strategy="fed_sb_data", secure_aggregation="secagg+"))
    assert check_run_strategy(RunConfig(strategy="fed_sb", dp=True))
    assert FedSbData.central_dp == frozenset()
    with pytest.raises(ValueError, match="calibration-examples"):
        FedSbData.Settings(calibration_examples=0)
