"""Devices, mixed precision, a quantised base, accumulation, checkpointing, schedules.

All on the CPU: torch runs bf16 autocast there, and bitsandbytes has a CPU backend for
its 4-bit base. Tests that need CUDA are marked ``gpu`` (skipped without it).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fedlora.config import ConfigError, RunConfig
from fedlora.lora.spec import CAUSAL_LM, LoraSpec
from fedlora.model.device import Placement, resolve_device
from fedlora.model.models import BaseLoading, apply_base_delta, build_lora_model
from fedlora.model.train import batch_loss, make_optimizer, train_steps
from fedlora.run.cli import main as cli_main
from tests.helpers import make_job, make_tiny_llama

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), dropout=0.0, task=CAUSAL_LM)


@pytest.fixture(scope="module")
def llama128(tmp_path_factory):
    """A hidden-128 tiny Llama: bitsandbytes quantises in blocks of 64 values."""
    return make_tiny_llama(tmp_path_factory.mktemp("llama128"), hidden=128)


def _batch(seed: int, n: int = 6, length: int = 12, vocab: int = 500):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 3] = -100  # prompt tokens carry no loss, as in fedlora's data
    return ids, torch.ones_like(ids), labels


def _lm_job(model, **overrides):
    cfg = RunConfig(
        task="causal-lm",
        dataset="chatterbot",
        model=str(model),
        lora_targets="q_proj,v_proj",
        lora_dropout=0.0,
        max_seq_len=64,
        batch_size=4,
        local_steps=3,
        **overrides,
    )
    return make_job(cfg, {"partition-id": 0, "num-partitions": 4})


# -- device ---------------------------------------------------------------------


@NO_CUDA
def test_auto_is_the_cpu_without_cuda_and_fp32_there():
    placement = Placement.resolve("auto", "auto")
    assert placement.device == torch.device("cpu") and placement.dtype == torch.float32
    assert resolve_device("cpu") == torch.device("cpu")


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_an_absent_device_is_refused_before_any_process_starts(device, capsys, monkeypatch):
    from fedlora.run import launch

    def started(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(launch, "local_federation", started)
    assert cli_main(["simulate", "-c", f"device={device}"]) == 2
    err = capsys.readouterr().err
    assert f"'device': '{device}'" in err and "no CUDA device" in err
    with pytest.raises(ConfigError, match="'device': 'tpu'"):
        RunConfig(device="tpu")


@NO_CUDA
def test_gpus_per_client_needs_a_gpu(capsys):
    assert cli_main(["simulate", "--gpus-per-client", "0.25"]) == 2
    assert "'--gpus-per-client': 0.25, but this machine has no CUDA" in capsys.readouterr().err
    assert cli_main(["simulate", "--gpus-per-client", "1.5"]) == 2
    assert "'--gpus-per-client': 1.5 must be a fraction" in capsys.readouterr().err


def test_gpus_per_client_becomes_flowers_client_resources(monkeypatch):
    from fedlora.run.local_run import simulation_federation

    assert "client-resources-num-gpus" not in simulation_federation(4, 2, 0.0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert simulation_federation(4, 2, 0.25) == {
        "num-supernodes": 4,
        "client-resources-num-cpus": 1,
        "init-args-num-cpus": 2,
        "client-resources-num-gpus": 0.25,
        "init-args-num-gpus": 2,
    }


def test_a_node_config_device_overrides_the_runs(tiny_model):
    job = make_job(RunConfig(model=str(tiny_model), device="cuda"), _node(device="cpu"))
    assert job.placement.device == torch.device("cpu")
    with pytest.raises(ConfigError, match="'device': 'gpu'"):
        make_job(RunConfig(model=str(tiny_model)), _node(device="gpu"))


def _node(**extra):
    return {"partition-id": 0, "num-partitions": 10, **extra}


# -- precision --------------------------------------------------------------------


def test_a_bf16_round_on_the_cpu_is_finite_float32_on_the_wire_and_close_to_fp32(tiny_llama):
    runs = {}
    for precision in ("fp32", "bf16"):
        tensors, metrics = _lm_job(tiny_llama, precision=precision, lr=1e-3).train()
        assert math.isfinite(metrics["train-loss"]) and metrics["train-steps"] == 3
        assert all(v.dtype == np.float32 for v in tensors.values())
        runs[precision] = metrics
    # bf16 keeps 8 bits of mantissa: the loss of the same steps agrees to about 1%
    assert runs["bf16"]["train-loss"] == pytest.approx(runs["fp32"]["train-loss"], rel=2e-2)


def test_trainable_parameters_keep_float32_master_weights_over_a_bf16_base(tiny_llama):
    placement = Placement(torch.device("cpu"), torch.bfloat16)
    model = build_lora_model(str(tiny_llama), 0, SPEC, seed=0, loading=BaseLoading(placement))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)  # the base at half the memory


# -- gradient accumulation and checkpointing ---------------------------------------


def _factors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_k_micro_batches_give_the_update_of_one_batch_of_k_b(tiny_llama):
    """Same examples, same AdamW step: 3 micro-batches against one batch of 6.

    The micro-batches have different numbers of loss tokens; the step weights each
    micro-batch's mean by its share of the examples, as the mean over 6 examples does.
    Tolerance: float32 summation order (1e-6 of the update).
    """
    ids, mask, labels = _batch(0)
    updates = []
    for cuts, accumulation in (((0, 6), 1), ((0, 2, 4, 6), 3), ((0, 1, 3, 6), 3)):
        model = build_lora_model(str(tiny_llama), 0, SPEC, seed=0)
        for name, p in model.named_parameters():  # B = 0 gives A no gradient: start off zero
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        before = _factors(model)
        loader = [(ids[a:b], mask[a:b], labels[a:b]) for a, b in itertools.pairwise(cuts)]
        result = train_steps(
            model,
            make_optimizer(model, 1e-2),
            loader,
            show_progress=False,
            accumulation=accumulation,
        )
        assert result.steps == 1 and result.examples_seen == 6
        updates.append({n: p - before[n] for n, p in _factors(model).items()})
    for name, one in updates[0].items():
        for other in updates[1:]:  # even micro-batches of 2, and uneven ones of 1, 2, 3
            torch.testing.assert_close(other[name], one, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama):
    ids, mask, labels = _batch(1)
    grads = []
    for checkpointing in (False, True):
        model = build_lora_model(str(tiny_llama), 0, SPEC, seed=0)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        model.train()
        batch_loss(model, ids, mask, labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-8)


def test_dp_with_accumulation_follows_opacus_logical_batches(tiny_llama):
    """With DP, ``grad-accumulation`` k makes the logical (Poisson) batch k x batch-size,
    processed in physical chunks of batch-size (Opacus's own splitting). Without noise and
    with a clip no gradient reaches, chunked and whole give the same update; the
    accountant counts logical steps."""
    from torch.utils.data import TensorDataset

    from fedlora.privacy.dp_sgd import PrivacyBudget, make_private

    ids, mask, labels = _batch(2, n=24)
    data = TensorDataset(ids, mask, labels)
    updates, budgets = [], []
    for physical in (None, 2):
        model = build_lora_model(str(tiny_llama), 0, SPEC, seed=0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        before = _factors(model)
        budget = PrivacyBudget("rdp", 1e-12, 8 / 24, 1e-5, float("inf"))
        private = make_private(
            model,
            make_optimizer(model, 1e-2),
            data,
            budget=budget,
            clip_norm=1e6,
            steps=3,
            seed=7,  # the same Poisson batches both times
            physical_batch_size=physical,
        )
        result = train_steps(
            private.model, private.optimizer, private.loader, show_progress=False, private=True
        )
        private.finish()
        assert result.steps == 3
        updates.append({n: p - before[n] for n, p in _factors(model).items()})
        budgets.append(private.budget.steps)
    assert budgets == [3, 3]  # logical steps, not the physical chunks
    for name, whole in updates[0].items():
        torch.testing.assert_close(updates[1][name], whole, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("physical", [None, 1])
def test_an_empty_poisson_batch_is_a_noise_step_and_keeps_the_batch_boundaries(
    tiny_llama, physical
):
    """At q = 0.05 over 40 examples about 1 draw in 8 is empty. Each is a step of noise
    alone, counted by the accountant, as in Opacus; with chunked logical batches the
    boundary Opacus queued for it is consumed, so none is left over at the end."""
    from torch.utils.data import TensorDataset

    from fedlora.privacy.dp_sgd import PrivacyBudget, make_private

    ids, mask, labels = _batch(4, n=40, length=8)
    model = build_lora_model(str(tiny_llama), 0, SPEC, seed=0)
    budget = PrivacyBudget("rdp", 1.0, 2 / 40, 1e-5, float("inf"))
    private = make_private(
        model,
        make_optimizer(model, 1e-3),
        TensorDataset(ids, mask, labels),
        budget=budget,
        clip_norm=1.0,
        steps=30,
        seed=3,
        physical_batch_size=physical,
    )
    batches = list(private.loader)
    logical = sum(1 for b in batches if b is None)  # empty draws; the others may be split in chunks
    assert logical > 0, "the draw has no empty batch: pick another seed"
    result = train_steps(
        private.model, private.optimizer, batches, show_progress=False, private=True
    )
    private.finish()
    assert private.budget.steps == 30  # every draw, empty or not
    assert private.optimizer._step_skip_queue == []  # no boundary left behind
    assert result.steps == 30 - logical  # the loss is recorded for non-empty steps


def test_dp_clips_bf16_per_sample_gradients_in_float32():
    """A norm taken in bf16 can round down by 2^-9: the clip bound would not hold."""
    from fedlora.model.train import upcast_grad_samples

    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(2))
    p.grad_sample = torch.ones(4, 3, dtype=torch.bfloat16)
    q.grad_sample = [torch.ones(1, 2, dtype=torch.bfloat16)] * 2
    upcast_grad_samples(torch.optim.SGD([p, q], lr=1.0))
    assert p.grad_sample.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in q.grad_sample)


def test_a_dp_round_with_accumulation_accounts_its_local_steps(tiny_llama):
    tensors, metrics = _lm_job(tiny_llama, dp=True, dp_noise=1.0, grad_accumulation=2).train()
    assert metrics["dp-steps"] == 3 and all(np.isfinite(v).all() for v in tensors.values())


@pytest.mark.parametrize("kind", ["fp32", "bf16", "4bit"])
def test_per_sample_gradients_match_one_example_at_a_time(kind, llama128):
    """What DP-SGD clips: Opacus's per-sample gradients of the LoRA factors, checked
    against a backward pass per example, in fp32, under bf16 autocast, and over a 4-bit
    base (the frozen base changes nothing Opacus hooks)."""
    from opacus import GradSampleModule

    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    placement = Placement(torch.device("cpu"), dtype)
    loading = BaseLoading(placement, "4bit" if kind == "4bit" else "none")
    model = build_lora_model(str(llama128), 0, SPEC, seed=0, loading=loading)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    ids, mask, labels = _batch(3, n=3)
    dp = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    with placement.autocast():
        loss = batch_loss(dp, ids, mask, labels)
    loss.backward()
    per_sample = {n: p.grad_sample.float() for n, p in dp.named_parameters() if p.requires_grad}
    # bf16 activations give bf16 per-sample gradients: compared by relative norm, 3%
    # (each element carries bf16's rounding of its own path)
    dp.zero_grad(set_to_none=True)
    dp.disable_hooks()
    for i in range(3):
        model.zero_grad(set_to_none=True)
        with placement.autocast():
            batch_loss(model, ids[i : i + 1], mask[i : i + 1], labels[i : i + 1]).backward()
        for name, p in dp.named_parameters():
            if p.requires_grad:
                if kind == "bf16":
                    error = (per_sample[name][i] - p.grad).norm() / p.grad.norm()
                    assert error < 3e-2, (name, float(error))
                else:
                    torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-6)


# -- learning-rate schedules -----------------------------------------------------


@pytest.mark.parametrize("span", ["run", "round"])
def test_the_learning_rate_over_two_rounds_matches_transformers(tiny_model, span):
    from transformers import get_cosine_schedule_with_warmup

    cfg = RunConfig(
        model=str(tiny_model),
        num_server_rounds=2,
        local_steps=5,
        lr=0.1,
        lr_schedule="cosine",
        warmup_steps=2,
        lr_schedule_span=span,
    )
    seen = []
    for server_round in (1, 2):
        job = make_job(cfg, _node(), server_round=server_round)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        scheduler = job.scheduler(optimizer)
        for _ in range(cfg.local_steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    total = 10 if span == "run" else 5
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    reference = get_cosine_schedule_with_warmup(reference_opt, 2, total)
    expected = []
    for step in range(10):
        if span == "round" and step == 5:
            reference = get_cosine_schedule_with_warmup(
                torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr), 2, total
            )
            reference_opt = reference.optimizer
        expected.append(reference_opt.param_groups[0]["lr"])
        reference_opt.step()
        reference.step()
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen[0] == 0.0 and max(seen) == pytest.approx(0.1)


def test_a_constant_schedule_without_warmup_is_exactly_lr(tiny_model):
    job = make_job(RunConfig(model=str(tiny_model)), _node())
    assert job.scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)) is None


# -- a quantised base --------------------------------------------------------------


def test_a_4bit_round_runs_on_the_cpu(llama128):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    job = _lm_job(llama128, base_quantization="4bit", precision="bf16", lr=1e-3)
    model = job.model()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    tensors, metrics = job.train()
    assert math.isfinite(metrics["train-loss"]) and metrics["train-steps"] == 3
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in tensors.values())
    assert any("lora_B" in k and np.abs(v).max() > 0 for k, v in tensors.items())  # it trained


def test_a_quantised_base_without_bitsandbytes_names_what_is_missing(monkeypatch):
    import builtins

    from fedlora.model.models import quantization_config

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("no bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ConfigError, match="'base-quantization': '4bit' needs bitsandbytes"):
        quantization_config("4bit", torch.bfloat16, CAUSAL_LM)


def test_flora_is_refused_with_a_quantised_base_and_a_packed_weight_never_merges(llama128, capsys):
    assert cli_main(["simulate", "-c", "strategy=flora", "-c", "base-quantization=4bit"]) == 2
    assert "'base-quantization': '4bit', but strategy 'flora' merges" in capsys.readouterr().err
    placement = Placement(torch.device("cpu"), torch.bfloat16)
    model = build_lora_model(str(llama128), 0, SPEC, seed=0, loading=BaseLoading(placement, "4bit"))
    layer = next(n for n, _ in model.named_modules() if n.endswith("self_attn.q_proj"))
    with pytest.raises(ValueError, match="is quantised"):
        apply_base_delta(model, {layer: np.zeros((128, 128), np.float32)})


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_calibration_gradients_match_autograd_on_the_weights_the_model_computes_with(
    quantization, llama128
):
    """fed_sb_data's round 1 on a decoder, also over a 4-bit base: the hooked dy^T x of
    each adapted layer equals autograd's d loss / d W on a plain float Llama whose every
    quantised weight is replaced by its dequantised value (what the 4-bit matmul uses)."""
    from fedlora.lora.state import GRAD_SUFFIX
    from fedlora.model.calibration import mean_base_gradients

    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    placement = Placement(torch.device("cpu"), torch.float32)
    loading = BaseLoading(placement, quantization)
    model = build_lora_model(str(llama128), 0, SPEC, seed=0, loading=loading)
    ids, mask, labels = _batch(5, n=5)
    grads, seen, loss = mean_base_gradients(
        model, [(ids[:2], mask[:2], labels[:2]), (ids[2:], mask[2:], labels[2:])]
    )
    reference = build_lora_model(str(llama128), 0, SPEC, seed=0).merge_and_unload()
    dequantised = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            plain = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            reference.get_submodule(plain).weight.data.copy_(w.float())
            dequantised += 1
    assert dequantised > 0 if quantization == "4bit" else dequantised == 0
    reference.requires_grad_(True)
    # the loss of all 5 examples as calibration weights them: each batch's mean, by size
    want = (
        sum(
            batch_loss(reference, ids[i:j], mask[i:j], labels[i:j]) * (j - i)
            for i, j in ((0, 2), (2, 5))
        )
        / 5
    )
    want.backward()
    assert seen == 5 and loss == pytest.approx(want.item(), rel=1e-4)
    assert len(grads) == 2 * 2  # 2 layers x (q_proj, v_proj)
    for key, g in grads.items():
        name = key.removesuffix(GRAD_SUFFIX).removeprefix("base_model.model.")
        ref = reference.get_submodule(name).weight.grad.numpy()
        assert g.shape == ref.shape and np.abs(ref).max() > 0
        np.testing.assert_allclose(g, ref, rtol=1e-3, atol=1e-6 * np.abs(ref).max())


def test_a_calibration_round_runs_over_a_4bit_base(llama128):
    """A node of fed_sb_data's round 1 with a 4-bit bf16 base: float32 d_out x d_in means."""
    pytest.importorskip("bitsandbytes")
    from fedlora.lora.plan import ClientPlan
    from fedlora.lora.state import GRAD_SUFFIX

    job = _lm_job(llama128, strategy="fed_sb_data", base_quantization="4bit", precision="bf16")
    job.plan = ClientPlan(rank=job.cfg.lora_rank, calibrate=6, send_a=False, send_b=False)
    tensors, metrics = job.train()
    assert metrics["calibration-examples"] == 6 and metrics["train-steps"] == 0
    layers = {n: m for n, m in job.model().named_modules() if n.endswith(("q_proj", "v_proj"))}
    assert sorted(tensors) == sorted(n + GRAD_SUFFIX for n in layers)
    for name, layer in layers.items():  # the packed 4-bit weight's logical d_out x d_in
        v = tensors[name + GRAD_SUFFIX]
        assert v.dtype == np.float32 and v.shape == (layer.out_features, layer.in_features)
    assert all(np.isfinite(v).all() and np.abs(v).max() > 0 for v in tensors.values())


@pytest.mark.gpu
def test_a_4bit_round_runs_on_cuda(llama128):
    tensors, metrics = _lm_job(llama128, base_quantization="4bit", device="cuda").train()
    assert math.isfinite(metrics["train-loss"])
    assert all(v.dtype == np.float32 for v in tensors.values())


# -- the estimate ------------------------------------------------------------------


def test_the_estimate_counts_what_the_model_has(tiny_llama):
    from fedlora.model.models import lora_spec
    from fedlora.run.estimate import NF4_BYTES, estimate

    cfg = RunConfig(
        task="causal-lm", model=str(tiny_llama), lora_targets="q_proj,v_proj", precision="fp32"
    )
    model = build_lora_model(cfg.model, 0, lora_spec(cfg), seed=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    e = estimate(cfg)
    assert (e.trainable_parameters, e.parameters) == (trainable, frozen)
    assert e.wire_dense == e.wire_uplink == 4 * trainable
    assert e.weights == 2 * 4 * frozen and e.trainable == 16 * trainable
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in n and "lm_head" not in n
    )
    q = estimate(cfg.replace(base_quantization="4bit", precision="bf16"))
    assert q.quantised_parameters == linear
    assert q.weights == pytest.approx(2 * (linear * NF4_BYTES + (frozen - linear) * 4))


def _held_bytes(model) -> int:
    """What a loaded base holds: its parameters, and bitsandbytes' block constants."""
    import bitsandbytes as bnb

    held = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            held += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                held += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return held


@pytest.mark.parametrize(
    "precision, quantization", [("fp32", "none"), ("bf16", "none"), ("bf16", "4bit")]
)
def test_the_estimated_weights_are_what_a_loaded_base_holds(llama128, precision, quantization):
    """Against the base as fedlora loads it (peft's k-bit preparation casts the rest to
    float32): one copy of the estimate's weights, within 0.1%."""
    pytest.importorskip("bitsandbytes")
    from fedlora.model.models import load_base_model
    from fedlora.run.estimate import estimate

    cfg = RunConfig(
        task="causal-lm",
        model=str(llama128),
        lora_targets="q_proj,v_proj",
        precision=precision,
        base_quantization=quantization,
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    loading = BaseLoading(Placement(torch.device("cpu"), dtype), quantization)
    base = load_base_model(cfg.model, 0, CAUSAL_LM, loading)
    assert estimate(cfg).weights / 2 == pytest.approx(_held_bytes(base), rel=1e-3)


def test_the_estimate_responds_to_checkpointing_dp_and_compression(tiny_llama):
    from fedlora.model.models import lora_spec
    from fedlora.run.estimate import estimate

    cfg = RunConfig(
        task="causal-lm", model=str(tiny_llama), lora_targets="q_proj,v_proj", precision="fp32"
    )
    model = build_lora_model(cfg.model, 0, lora_spec(cfg), seed=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    e = estimate(cfg)
    assert estimate(cfg.replace(gradient_checkpointing=True)).activations < e.activations
    assert estimate(cfg.replace(dp=True)).dp_per_sample == cfg.batch_size * trainable * 4
    sparse = estimate(cfg.replace(uplink_density=0.1, uplink_values="int8"))
    assert sparse.wire_uplink < e.wire_dense / 4
