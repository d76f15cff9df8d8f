"""DP-SGD with Opacus: true cumulative epsilon, correct updates, frozen parameters untouched."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from fedlora.lora.spec import LoraSpec
from fedlora.model.models import build_lora_model
from fedlora.model.peft_state import state_from_peft
from fedlora.model.train import make_optimizer, train_steps
from fedlora.privacy.dp_sgd import BudgetExhaustedError, PrivacyBudget, make_private, new_budget

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("query", "value"))


def _data(n=64, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randint(100, 2000, (n, seq), generator=g),
        torch.ones(n, seq, dtype=torch.long),
        torch.randint(0, 20, (n,), generator=g),
    )


def _model(tiny_model, freeze_a=False):
    model = build_lora_model(str(tiny_model), 20, SPEC, seed=0)
    if freeze_a:
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return model


def _budget(**kw):
    args = dict(
        accountant="rdp",
        target_epsilon=50.0,
        delta=1e-5,
        num_examples=64,
        batch_size=16,
        steps_per_round=5,
        expected_rounds=3,
        noise_multiplier=1.0,
    )
    args.update(kw)
    return new_budget(**args)


@pytest.mark.parametrize("accountant, reference", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_is_cumulative_and_matches_an_independent_accountant(
    tiny_model, accountant, reference
):
    budget = _budget(accountant=accountant)
    state = budget.to_state()
    epsilons, steps_taken = [], 0
    for r in range(3):  # three rounds, each a fresh process: only the stored state survives
        budget = PrivacyBudget.from_state(state)
        model = _model(tiny_model)
        run = make_private(
            model,
            make_optimizer(model, 1e-3),
            _data(),
            budget=budget,
            clip_norm=1.0,
            steps=5,
            seed=r,
        )
        result = train_steps(run.model, run.optimizer, run.loader, show_progress=False)
        run.finish()
        steps_taken += result.steps
        state = budget.to_state()
        epsilons.append(budget.epsilon())
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert budget.steps == steps_taken
    independent = reference()
    independent.history = [(1.0, 16 / 64, steps_taken)]
    assert budget.epsilon() == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-6)


def test_calibrated_sigma_reaches_the_target_over_the_expected_rounds():
    budget = _budget(target_epsilon=3.0, noise_multiplier=None)
    assert budget.noise_multiplier > 0.5
    total = budget.epsilon_after(5 * 3)
    assert total == pytest.approx(3.0, rel=0.02) and total <= 3.0 * 1.001
    budget.history = [(budget.noise_multiplier, budget.sample_rate, 10)]
    with pytest.raises(BudgetExhaustedError, match="would reach .* > target 3.0"):
        budget.check_round(10)
    budget.check_round(5)  # the last expected round still fits


def test_zero_noise_and_no_clipping_equals_plain_training(tiny_model):
    data = _data()
    batches = list(DataLoader(data, batch_size=16, shuffle=False))
    plain = _model(tiny_model)
    dp = copy.deepcopy(plain)
    opt = make_optimizer(plain, 1e-2)
    torch.manual_seed(0)  # the same dropout masks in both runs
    train_steps(plain, opt, batches, show_progress=False)
    run = make_private(
        dp,
        make_optimizer(dp, 1e-2),
        data,
        budget=_budget(noise_multiplier=0.0, target_epsilon=float("inf")),
        clip_norm=1e6,
        steps=4,
        seed=0,
    )
    torch.manual_seed(0)
    train_steps(run.model, run.optimizer, batches, show_progress=False)  # the same batches
    run.finish()
    a, b = state_from_peft(plain, 1.0).to_state_dict(), state_from_peft(dp, 1.0).to_state_dict()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_sent_update_is_what_the_optimizer_applied_and_frozen_a_gets_no_noise(tiny_model):
    model = _model(tiny_model, freeze_a=True)
    before = state_from_peft(model, 1.0).to_state_dict()
    optimizer = make_optimizer(model, 1e-2)
    run = make_private(
        model,
        optimizer,
        _data(),
        budget=_budget(noise_multiplier=2.0),
        clip_norm=0.5,
        steps=4,
        seed=0,
    )
    applied = {}
    original_step = run.optimizer.original_optimizer.step

    def recording_step(*args, **kwargs):
        out = original_step(*args, **kwargs)
        for group in run.optimizer.param_groups:
            for p in group["params"]:
                applied[id(p)] = p.detach().clone()
        return out

    run.optimizer.original_optimizer.step = recording_step
    train_steps(run.model, run.optimizer, run.loader, show_progress=False)
    run.finish()
    named = dict(model.named_parameters())
    sent = state_from_peft(model, 1.0).to_state_dict()
    checked = 0
    for name, p in named.items():
        if id(p) in applied:
            torch.testing.assert_close(p.detach(), applied[id(p)], rtol=0, atol=0)
            checked += 1
        if "lora_A" in name:
            assert not p.requires_grad and getattr(p, "grad_sample", None) is None
    assert checked > 0
    for key, value in sent.items():
        if "lora_A" in key:
            np.testing.assert_array_equal(value, before[key])  # frozen: no noise, no change
        elif "lora_B" in key:
            assert not np.array_equal(value, before[key])  # trained (and noised)


def _dp_round(tiny_model, **overrides):
    """One real DP-SGD training round of a node (round 1, partition 0), its trained tensors."""
    from fedlora.config import RunConfig
    from tests.helpers import make_job

    cfg = RunConfig(
        model=str(tiny_model),
        dp=True,
        dp_noise=1.0,
        local_steps=3,
        batch_size=8,
        max_seq_len=16,
        **overrides,
    )
    tensors, metrics = make_job(cfg, {"partition-id": 0, "num-partitions": 10}).train()
    assert metrics["dp-steps"] == 3
    return tensors


def test_dp_noise_cannot_be_replayed_from_the_run_seed_by_default(tiny_model):
    """Two runs with the same seed, config and data draw different noise (and batches):
    the server, which knows the seed, cannot regenerate a client's noise."""
    first, second = _dp_round(tiny_model), _dp_round(tiny_model)
    differ = [k for k in first if "lora_B" in k and not np.array_equal(first[k], second[k])]
    assert differ, "two DP runs with the same seed produced the same update"


def test_reproducible_noise_is_an_explicit_opt_in_that_repeats_exactly(tiny_model):
    first = _dp_round(tiny_model, dp_reproducible_noise=True)
    second = _dp_round(tiny_model, dp_reproducible_noise=True)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_a_node_can_refuse_reproducible_noise(tiny_model):
    """A node's owner, not only the server, decides whether its noise may be replayable."""
    from fedlora.config import ConfigError, RunConfig
    from tests.helpers import make_job

    cfg = RunConfig(model=str(tiny_model), dp=True, dp_reproducible_noise=True, max_seq_len=16)
    node = {"partition-id": 0, "num-partitions": 10, "refuse-reproducible-noise": "true"}
    with pytest.raises(ConfigError, match="'dp-reproducible-noise'.*refused by this node"):
        make_job(cfg, node).train()


def test_summary_marks_reproducible_noise_not_private():
    from fedlora.config import RunConfig
    from fedlora.server.outputs import client_dp_line

    assert "NOT PRIVATE" in client_dp_line(RunConfig(dp=True, dp_reproducible_noise=True))
    assert "entropy pool" in client_dp_line(RunConfig(dp=True))
