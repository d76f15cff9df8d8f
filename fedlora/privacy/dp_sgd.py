"""Client-side DP-SGD with Opacus, and a privacy budget that lasts across rounds.

Most federated examples build a new ``PrivacyEngine`` every round, so their epsilon
covers one round. Here a client's accountant history is part of its persistent state
(the node store): every round restores it before training, Opacus adds this round's
steps through its optimizer hook, and the reply carries the epsilon spent so far. The
noise multiplier is calibrated once, from the target (epsilon, delta) over all the
steps the client is expected to take in all the rounds it is expected to join, and kept.

Sampling is Poisson with rate q = batch / n_k, as Opacus analyses it, for exactly
``local-steps`` steps per round (Opacus's own ``make_private`` would infer q from the
loader's length, which is wrong for a fixed step count, so the pieces are assembled
here: ``GradSampleModule``, ``DPOptimizer`` and the accountant's optimizer hook).
Only parameters that require gradients (the LoRA factors and the head; not a frozen A)
get per-sample gradients and noise. Hooks mode is used: ghost clipping needs a loss
reduction Opacus can split per sample, which token-level causal-LM losses are not.

Randomness: the noise and the Poisson sampling are drawn from generators seeded from the
operating system's entropy pool (``os.urandom``), never from the run's seed, which the
server knows: whoever can regenerate the noise can subtract it, and whoever knows which
examples were sampled loses the amplification by sampling. The noise uses Opacus's
``secure_mode`` draw (robust to floating-point attacks); Opacus's cryptographic generator
(torchcsprng) has no build for current torch, hence the seeded-from-entropy generator.
A reproducible mode (``seed`` given) exists for research and is marked not private.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import wrap_data_loader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, TensorDataset, default_collate

ACCOUNTANTS = ("rdp", "prv")


class BudgetExhaustedError(RuntimeError):
    """The next round would take the client past its privacy budget."""


@dataclass
class PrivacyBudget:
    """One client's DP state for its whole lifetime (JSON-serialisable via ``to_state``)."""

    accountant: str
    noise_multiplier: float
    sample_rate: float
    delta: float
    target_epsilon: float
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def _accountant(self, extra_steps: int = 0) -> Any:
        acc = create_accountant(self.accountant)
        history = [tuple(h) for h in self.history]
        if extra_steps:
            history.append((self.noise_multiplier, self.sample_rate, extra_steps))
        acc.history = history
        return acc

    @property
    def steps(self) -> int:
        """DP-SGD steps taken so far."""
        return sum(int(h[2]) for h in self.history)

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        if not self.history:
            return 0.0
        return float(self._accountant().get_epsilon(delta=self.delta))

    def epsilon_after(self, steps: int) -> float:
        """Epsilon if ``steps`` more steps were taken."""
        return float(self._accountant(steps).get_epsilon(delta=self.delta))

    def check_round(self, steps: int) -> None:
        """Raise :class:`BudgetExhaustedError` if ``steps`` more would exceed the target."""
        after = self.epsilon_after(steps)
        if after > self.target_epsilon * 1.001:
            raise BudgetExhaustedError(
                f"privacy budget exhausted: epsilon {self.epsilon():.3f} spent, another round "
                f"of {steps} steps would reach {after:.3f} > target {self.target_epsilon}"
            )

    def to_state(self) -> dict[str, Any]:
        """Plain dict for the node store."""
        return {
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "history": [list(h) for h in self.history],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrivacyBudget:
        """Inverse of :meth:`to_state`."""
        return cls(
            accountant=str(state["accountant"]),
            noise_multiplier=float(state["noise_multiplier"]),
            sample_rate=float(state["sample_rate"]),
            delta=float(state["delta"]),
            target_epsilon=float(state["target_epsilon"]),
            history=[(float(a), float(b), int(c)) for a, b, c in state.get("history", [])],
        )


def default_delta(num_examples: int) -> float:
    """Delta = min(1e-5, 1 / (10 n_k)): below 1/n_k, as DP practice asks."""
    return min(1e-5, 1.0 / (10.0 * max(num_examples, 1)))


def new_budget(
    *,
    accountant: str,
    target_epsilon: float,
    delta: float,
    num_examples: int,
    batch_size: int,
    steps_per_round: int,
    expected_rounds: int,
    noise_multiplier: float | None = None,
) -> PrivacyBudget:
    """Calibrate sigma once for ``steps_per_round * expected_rounds`` steps at q = B / n."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"Invalid value for 'dp-accountant': {accountant!r} (rdp or prv)")
    q = min(1.0, batch_size / max(num_examples, 1))
    if noise_multiplier is None:
        noise_multiplier = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=q,
            steps=steps_per_round * expected_rounds,
            accountant=accountant,
        )
    return PrivacyBudget(accountant, float(noise_multiplier), q, delta, target_epsilon)


@dataclass
class PrivateTraining:
    """The model, optimizer and loader of one DP round, wired to the client's budget."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    budget: PrivacyBudget

    accountant: Any

    def finish(self) -> None:
        """Record this round's steps (taken by the accountant hook) in the budget."""
        self.budget.history = [tuple(h) for h in self.accountant.history]
        self.model.remove_hooks()  # the wrapped peft model is clean again


def entropy_generator(device: torch.device | None = None) -> torch.Generator:
    """A torch generator seeded with 64 bits from ``os.urandom``: no one can replay its draws."""
    generator = torch.Generator(device=device or torch.device("cpu"))
    return generator.manual_seed(int.from_bytes(os.urandom(8), "little"))


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TensorDataset,
    *,
    budget: PrivacyBudget,
    clip_norm: float,
    steps: int,
    seed: int | None = None,
    physical_batch_size: int | None = None,
    device: torch.device | None = None,
) -> PrivateTraining:
    """Wrap ``model``/``optimizer`` for DP-SGD over ``steps`` Poisson batches of ``data``.

    ``seed=None`` (the default, and the only private choice) draws the sampling and the
    noise from two generators seeded from the OS entropy pool. An integer ``seed`` makes
    both reproducible, for research: then the run is not private against whoever knows
    the seed. ``physical_batch_size``: each logical (Poisson) batch is processed in
    chunks of at most this many examples, with Opacus's own accumulation
    (``BatchMemoryManager``'s splitting): the noise and the accountant's steps belong to
    the logical batch. ``device``: where the noise is drawn (the model's device).
    """
    budget.check_round(steps)
    accountant = create_accountant(budget.accountant)
    accountant.history = [tuple(h) for h in budget.history]
    where = device or torch.device("cpu")
    if seed is None:
        sampling, noise = entropy_generator(), entropy_generator(where)
    else:
        sampling = torch.Generator().manual_seed(seed)
        noise = torch.Generator(device=where).manual_seed(seed + 1)
    sampler = UniformWithReplacementSampler(
        num_samples=len(data), sample_rate=budget.sample_rate, generator=sampling, steps=steps
    )
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=_collate_or_none)
    dp_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    expected = max(1, math.floor(len(data) * budget.sample_rate))
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=budget.noise_multiplier,
        max_grad_norm=clip_norm,
        expected_batch_size=expected,
        loss_reduction="mean",
        generator=noise,
        secure_mode=seed is None,
    )
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=budget.sample_rate))
    if physical_batch_size is not None and physical_batch_size < expected:
        loader = wrap_data_loader(
            data_loader=loader, max_batch_size=physical_batch_size, optimizer=dp_optimizer
        )
    return PrivateTraining(dp_model, dp_optimizer, loader, budget, accountant)


def _collate_or_none(batch: list) -> Any:
    """Poisson sampling can draw an empty batch; the loop skips it (no step, no release)."""
    return default_collate(batch) if batch else None
