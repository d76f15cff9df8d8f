"""Fed-SB: the exact average of the r x r cores, the plan, the peft layer and the export.

The aggregate is checked against sum_k p_k s B R_k A materialised from the cores the
nodes sent (not from the strategy's decoded states); the layer against base + s B R A x
written out by hand; the export against the model with its core.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import PeftModel

from fedlora.lora.plan import PLAN_VERSION, ClientPlan, core_basis
from fedlora.lora.seeded import seeded_orthonormal
from fedlora.lora.spec import LoraSpec
from fedlora.lora.state import A_SUFFIX, B_SUFFIX, CORE_SUFFIX, AdapterError, state_from_dict
from fedlora.model.lora_core import attach_core
from fedlora.model.models import build_lora_model, load_base_model
from fedlora.model.peft_state import load_into_peft, state_from_peft
from fedlora.strategies.api import ClientUpdate
from fedlora.strategies.conformance import SimulatedClient, assert_conforms
from fedlora.strategies.fed_sb import FedSb, core_of, fold
from tests.strategies.test_builtins import _direct, _make

RANK = 4
SPEC = LoraSpec(RANK, 8.0, ("query", "value"), dropout=0.0)


def test_conforms():
    assert_conforms(FedSb)


def test_seeded_bases_are_orthonormal_deterministic_and_per_module():
    a, b = core_basis("m.q", 4, 10, 12, seed=3)
    np.testing.assert_allclose(a.astype(np.float64) @ a.T, np.eye(4), atol=1e-6)
    np.testing.assert_allclose(b.T.astype(np.float64) @ b, np.eye(4), atol=1e-6)
    again = core_basis("m.q", 4, 10, 12, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip((a, b), again, strict=True))
    assert not np.allclose(core_basis("m.v", 4, 10, 12, seed=3)[0], a)
    assert not np.allclose(core_basis("m.q", 4, 10, 12, seed=4)[0], a)
    with pytest.raises(ValueError, match="rank"):
        seeded_orthonormal("m", 5, 4, 0)


def _one_round(weights_n=(10, 30, 60), seed=0):
    """One round by hand: the raw replies (cores as sent), the decoded updates, the result."""
    strategy, current, rng = _make(FedSb, [RANK], seed=seed)
    replies, updates = [], []
    for i, n in enumerate(weights_n):
        client = SimulatedClient(i, n, RANK)
        plan = strategy.client_plan(1, i, RANK)
        payload = strategy.payload(1, i, plan, current)
        reply, metrics = client.train(strategy, plan, payload, current, rng)
        replies.append(reply)
        state = strategy.decode_update(1, plan, reply, current)
        updates.append(ClientUpdate(i, n, state, metrics, plan))
    w = np.asarray(weights_n, float) / np.sum(weights_n)
    return strategy, current, replies, updates, w, strategy.aggregate(1, updates, w, current)


def test_aggregate_is_the_exact_average_of_the_sent_cores():
    strategy, current, replies, updates, w, out = _one_round()
    s = strategy.scaling(RANK)
    for m, f in out.factors.items():
        d_out, d_in = f.b.shape[0], f.a.shape[1]
        a0, b0 = core_basis(m, RANK, d_in, d_out, strategy.seed)
        a0, b0 = a0.astype(np.float64), b0.astype(np.float64)
        ideal = sum(
            wk * s * b0 @ r[m + CORE_SUFFIX].astype(np.float64) @ a0
            for r, wk in zip(replies, w, strict=True)
        )
        got = out.scaling * f.b.astype(np.float64) @ f.a.astype(np.float64)
        np.testing.assert_allclose(got, ideal, atol=1e-6)
        assert np.abs(ideal).max() > 1e-3  # the nodes moved R: the check is not 0 == 0
        np.testing.assert_array_equal(f.a, current.factors[m].a)  # A never moves
        # the next round's payload is that average, sum p_k R_k
        mean = sum(
            wk * r[m + CORE_SUFFIX].astype(np.float64) for r, wk in zip(replies, w, strict=True)
        )
        np.testing.assert_allclose(core_of(f.b, b0), mean, atol=1e-6)
    for k, v in out.dense.items():
        np.testing.assert_allclose(
            v, sum(wk * r[k] for r, wk in zip(replies, w, strict=True)), atol=1e-6
        )
    assert _direct(updates, w, out) < 1e-5


def test_plan_trains_and_sends_only_the_core():
    strategy, current, _ = _make(FedSb, [RANK])
    plan = strategy.client_plan(1, 0, RANK)
    assert plan.train_core and not plan.send_a and not plan.send_b
    assert ClientPlan.from_json(plan.to_json()) == plan
    assert f'"version": {PLAN_VERSION}' in plan.to_json()
    module = next(iter(current.factors))
    assert not plan.trains(module + ".lora_A.default.weight")  # peft's parameter names
    assert not plan.trains(module + ".lora_B.default.weight")
    assert plan.trains(module + ".lora_R.default.weight")
    assert all(plan.trains(k) for k in current.dense)
    shapes = plan.reply_shapes(current)
    assert {k for k in shapes if k.endswith(CORE_SUFFIX)} == {
        m + CORE_SUFFIX for m in current.factors
    }
    assert not any(k.endswith((A_SUFFIX, B_SUFFIX)) for k in shapes)
    assert all(shapes[m + CORE_SUFFIX] == (RANK, RANK) for m in current.factors)
    # the payload is R and the head, and the node starts from the seeded bases and that R
    payload = strategy.payload(1, 0, plan, current)
    assert set(payload) == {m + CORE_SUFFIX for m in current.factors} | set(current.dense)
    fresh = SimulatedClient(0, 1, RANK).fresh(current, RANK, np.random.default_rng(0))
    start = plan.start(fresh, payload)
    for m, f in current.factors.items():
        a0, b0 = core_basis(m, RANK, f.a.shape[1], f.b.shape[0], strategy.seed)
        np.testing.assert_array_equal(start[m + A_SUFFIX], a0)
        np.testing.assert_array_equal(start[m + B_SUFFIX], b0)
        np.testing.assert_array_equal(start[m + CORE_SUFFIX], payload[m + CORE_SUFFIX])
    assert set(plan.reply(start)) == set(shapes)
    with pytest.raises(AdapterError, match="sends neither"):
        ClientPlan(rank=RANK, train_core=True)
    with pytest.raises(AdapterError, match="reinit"):
        ClientPlan(rank=RANK, train_core=True, send_a=False, send_b=False, reinit=True)


def test_decode_refuses_a_reply_with_factors_or_without_a_core():
    strategy, current, _ = _make(FedSb, [RANK])
    plan = strategy.client_plan(1, 0, RANK)
    reply = strategy.payload(1, 0, plan, current)
    module = next(iter(current.factors))
    with pytest.raises(AdapterError, match="never travel"):
        strategy.decode_update(
            1, plan, reply | {module + B_SUFFIX: current.factors[module].b}, current
        )
    del reply[module + CORE_SUFFIX]
    with pytest.raises(AdapterError, match="lacks"):
        strategy.decode_update(1, plan, reply, current)


def test_restore_fixed_projects_noise_back_onto_the_basis():
    strategy, *_, out = _one_round()
    rng = np.random.default_rng(5)
    noisy = state_from_dict(
        {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in out.to_state_dict().items()},
        out.scaling,
    )
    restored = strategy.restore_fixed(noisy)
    for m, f in restored.factors.items():
        a0, b0 = core_basis(m, RANK, f.a.shape[1], f.b.shape[0], strategy.seed)
        np.testing.assert_array_equal(f.a, a0)
        np.testing.assert_allclose(f.b, fold(b0, core_of(noisy.factors[m].b, b0)), atol=1e-6)
        np.testing.assert_allclose(fold(b0, core_of(f.b, b0)), f.b, atol=1e-6)  # in the span
        if f.b.shape[0] > RANK:  # B square (m.v: d_out = 4) spans everything
            assert not np.allclose(f.b, noisy.factors[m].b, atol=1e-3)


# --------------------------------------------------------------------------- #
# The peft layer                                                              #
# --------------------------------------------------------------------------- #
def _core_model(tiny_model, seed=0):
    """A tiny BERT with LoRA and a core, A and B the seeded bases, R random."""
    model = build_lora_model(str(tiny_model), 20, SPEC, seed=0)
    assert attach_core(model) == 4  # 2 layers x (query, value)
    plan = ClientPlan(rank=RANK, init_seed=seed, train_core=True, send_a=False, send_b=False)
    start = plan.start(state_from_peft(model, SPEC.scaling).to_state_dict(), {})
    rng = np.random.default_rng(seed)
    for k in start:
        if k.endswith(CORE_SUFFIX):
            start[k] = rng.standard_normal(start[k].shape).astype(np.float32)
    load_into_peft(model, state_from_dict(start, SPEC.scaling))
    return model.eval(), start


def _inputs(n=3, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (n, length), generator=g), torch.ones(n, length, dtype=torch.long)


def test_core_layer_is_base_plus_s_b_r_a_x(tiny_model):
    model, start = _core_model(tiny_model)
    assert sum(k.endswith(CORE_SUFFIX) for k in start) == 4  # 2 layers x (query, value)
    name = "base_model.model.bert.encoder.layer.1.attention.self.value"
    layer = model.get_submodule(name)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer(x).numpy().astype(np.float64)
        base = layer.get_base_layer()
        w0, bias = base.weight.numpy().astype(np.float64), base.bias.numpy().astype(np.float64)
    a = start[name + A_SUFFIX].astype(np.float64)
    b = start[name + B_SUFFIX].astype(np.float64)
    r = start[name + CORE_SUFFIX].astype(np.float64)
    xs = x.numpy().astype(np.float64)
    want = xs @ w0.T + bias + SPEC.scaling * xs @ (b @ r @ a).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(SPEC.scaling * xs @ (b @ r @ a).T).max() > 1e-2  # the core contributes
    # peft's merge goes through the variant too: merged weights give the same outputs
    ids, mask = _inputs()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, before)


def test_only_the_core_and_head_are_trainable(tiny_model):
    model, _ = _core_model(tiny_model)
    plan = ClientPlan(rank=RANK, train_core=True, send_a=False, send_b=False)
    for name, p in model.named_parameters():
        if p.requires_grad and not plan.trains(name):
            p.requires_grad_(False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_R" in n or "classifier" in n for n in trainable)
    assert sum("lora_R" in n for n in trainable) == 4


def test_folded_export_loads_in_peft_and_matches_the_core_model(tiny_model, tmp_path):
    model, start = _core_model(tiny_model)
    folded = {k: v for k, v in start.items() if not k.endswith(CORE_SUFFIX)}
    for k, r in start.items():
        if k.endswith(CORE_SUFFIX):
            b_key = k[: -len(CORE_SUFFIX)] + B_SUFFIX
            folded[b_key] = fold(start[b_key], r)
    plain = build_lora_model(str(tiny_model), 20, SPEC, seed=0)
    load_into_peft(plain, state_from_dict(folded, SPEC.scaling))
    plain.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(
        load_base_model(str(tiny_model), 20), str(tmp_path / "adapter")
    )
    ids, mask = _inputs()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = loaded.eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the core matters: the same A and B without R folded in are another model
        unfolded = {k: v for k, v in start.items() if not k.endswith(CORE_SUFFIX)}
        load_into_peft(plain, state_from_dict(unfolded, SPEC.scaling))
        other = plain.eval()(input_ids=ids, attention_mask=mask).logits
        assert (other - want).abs().max() > 1e-3


def test_dp_sgd_clips_and_noises_the_core_only(tiny_model):
    from torch.utils.data import TensorDataset

    from fedlora.model.train import make_optimizer, train_steps
    from fedlora.privacy.dp_sgd import make_private, new_budget

    model, _ = _core_model(tiny_model)
    model.train()
    plan = ClientPlan(rank=RANK, train_core=True, send_a=False, send_b=False)
    for name, p in model.named_parameters():
        if p.requires_grad and not plan.trains(name):
            p.requires_grad_(False)
    ids, mask = _inputs(n=24, seed=2)
    data = TensorDataset(ids, mask, torch.arange(24) % 20)
    budget = new_budget(
        accountant="rdp",
        target_epsilon=8.0,
        delta=1e-5,
        num_examples=24,
        batch_size=8,
        steps_per_round=3,
        expected_rounds=1,
    )
    before = state_from_peft(model, SPEC.scaling).to_state_dict()
    run = make_private(
        model, make_optimizer(model, 1e-2), data, budget=budget, clip_norm=1.0, steps=3, seed=0
    )
    result = train_steps(run.model, run.optimizer, run.loader, show_progress=False, private=True)
    run.finish()
    after = state_from_peft(model, SPEC.scaling).to_state_dict()
    assert result.steps == 3 and 0 < budget.epsilon() < 8.0
    cores = [k for k in before if k.endswith(CORE_SUFFIX)]
    assert all(not np.array_equal(before[k], after[k]) for k in cores)  # noised and stepped
    for k in before:
        if k.endswith((A_SUFFIX, B_SUFFIX)):
            np.testing.assert_array_equal(before[k], after[k])


def test_opacus_per_sample_gradients_of_the_core_match_one_example_at_a_time(tiny_model):
    from opacus import GradSampleModule

    from fedlora.model.train import batch_loss

    model, _ = _core_model(tiny_model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_R" in name)
    model.train()  # Opacus captures activations in training mode only; BERT's dropout off
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids, mask = _inputs(n=3, seed=4)
    labels = torch.tensor([1, 5, 7])
    dp = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    (batch_loss(dp, ids, mask, labels) * 3).backward()  # the batch's mean, times 3: a sum
    cores = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(cores) == 4 and all(p.grad_sample is not None for p in cores.values())
    per_sample = {n: p.grad_sample.detach().clone() for n, p in cores.items()}
    dp.zero_grad(set_to_none=True)
    dp.disable_hooks()
    for i in range(3):
        model.zero_grad(set_to_none=True)
        batch_loss(model, ids[i : i + 1], mask[i : i + 1], labels[i : i + 1]).backward()
        for n, p in cores.items():
            torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-4, atol=1e-6)
    assert max(float(g.abs().max()) for g in per_sample.values()) > 1e-5
