"""FedProx's proximal term, against its gradient written out by hand."""

from __future__ import annotations

import pytest
import torch

from fedlora.config import ConfigError, RunConfig
from fedlora.model.models import build_lora_model
from fedlora.model.train import train_steps
from tests.model.test_accelerators import SPEC, _batch, _factors


def _two_sgd_steps(tiny_llama, mu: float, lr: float = 0.1):
    model = build_lora_model(str(tiny_llama), 0, SPEC, seed=0)
    for name, p in model.named_parameters():  # B = 0 gives A no gradient: start off zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    start = _factors(model)
    batch = _batch(0)
    trajectory = []
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)

    def record(*_):
        trajectory.append(_factors(model))

    optimizer.register_step_post_hook(record)
    train_steps(model, optimizer, [batch, batch], show_progress=False, prox_mu=mu)
    return start, trajectory


def test_the_proximal_term_adds_mu_times_the_distance_from_the_start(tiny_llama):
    """Two SGD steps: the first is the plain step (w = w_0 there); the second differs from
    the plain one by exactly -lr mu (w_1 - w_0)."""
    lr, mu = 0.1, 3.0
    start, plain = _two_sgd_steps(tiny_llama, 0.0, lr)
    _, prox = _two_sgd_steps(tiny_llama, mu, lr)
    for name, w0 in start.items():
        torch.testing.assert_close(prox[0][name], plain[0][name])
        expected = plain[1][name] - lr * mu * (plain[0][name] - w0)
        torch.testing.assert_close(prox[1][name], expected, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(prox[1][n], plain[1][n]) for n in start)  # the term acted


def test_fedprox_is_refused_with_dp_and_must_not_be_negative():
    with pytest.raises(ConfigError, match="'fedprox-mu': 0.1 cannot be combined with dp=true"):
        RunConfig(dp=True, fedprox_mu=0.1)
    with pytest.raises(ConfigError, match="'fedprox-mu'"):
        RunConfig(fedprox_mu=-1.0)
