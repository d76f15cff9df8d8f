"""Local training and evaluation loops: plain PyTorch, a progress bar, nothing hidden."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from tqdm.auto import tqdm

from fedlora.model.device import Placement
from fedlora.model.lm import evaluate_lm, example_mean_loss


@dataclass(frozen=True)
class TrainResult:
    """What one local round produced."""

    steps: int
    examples_seen: int
    mean_loss: float
    first_loss: float
    last_loss: float
    lrs: tuple[float, ...] = ()  # the learning rate of each optimizer step


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy on a held-out set (causal LM: token loss and exact match)."""

    loss: float
    accuracy: float
    num_examples: int


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters with ``requires_grad`` (LoRA factors and the head)."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only; frozen ones never enter the optimizer."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("The model has no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def sampled_loader(data: TensorDataset, batch_size: int, steps: int, seed: int) -> DataLoader:
    """A loader that yields exactly ``steps`` batches, sampling with replacement if needed."""
    return example_loader(data, batch_size, steps * batch_size, seed)


def example_loader(data: TensorDataset, batch_size: int, count: int, seed: int) -> DataLoader:
    """Batches of exactly ``count`` examples drawn from ``data`` (the last batch smaller).

    Without replacement up to the data's size; beyond it, some examples repeat.
    """
    if count <= 0:
        raise ValueError(f"A loader needs a positive number of examples, not {count}")
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(
        data, replacement=count > len(data), num_samples=count, generator=generator
    )
    return DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=False)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    warmup_steps: int,
    total_steps: int,
    start_step: int = 0,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Transformers' schedule ``name`` over ``total_steps``, positioned at ``start_step``.

    None for a constant rate without warm-up (the rate is then exactly ``lr``). A client
    that joins in a later round starts the run's schedule where that round begins.
    """
    if name == "constant" and warmup_steps == 0:
        return None
    from transformers import get_scheduler

    kind = "constant_with_warmup" if name == "constant" else name
    scheduler = get_scheduler(
        kind,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=max(total_steps, 1),
    )
    with warnings.catch_warnings():  # stepping before any optimizer step is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start_step):
            scheduler.step()
    return scheduler


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    desc: str = "train",
    show_progress: bool = True,
    *,
    accumulation: int = 1,
    placement: Placement | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    private: bool = False,
    prox_mu: float = 0.0,
) -> TrainResult:
    """Optimizer steps over ``loader``'s micro-batches; returns the loss trajectory.

    Without DP, every ``accumulation`` micro-batches make one step: each micro-batch's
    mean loss is weighted by its share of the step's examples, so k micro-batches of b
    give the update of one batch of k b. With DP (``private``), the loader comes from
    :func:`fedlora.privacy.dp_sgd.make_private`, split by Opacus into physical batches;
    its optimizer decides when a logical batch ends (Opacus's own semantics). Forward
    passes run under ``placement``'s autocast; fp16 uses a gradient scaler.

    ``prox_mu`` > 0 adds FedProx's proximal term (mu / 2) ||w - w_0||^2 over the trainable
    parameters, w_0 being where they start (the received global adapter), once per step;
    the recorded loss is the data loss alone. Not with DP (the run config refuses it).
    """
    placement = placement or Placement()
    anchor = proximal_anchor(model) if prox_mu > 0 else None
    scaler = None if private else placement.scaler()
    model.train()
    losses: list[float] = []
    lrs: list[float] = []
    seen = 0
    group: list[tuple[torch.Tensor, ...]] = []
    bar = tqdm(loader, desc=desc, leave=False, disable=not show_progress, mininterval=2.0)
    for batch in bar:
        if batch is None:  # an empty Poisson batch (DP-SGD only)
            if private:
                noise_only_step(optimizer)
            continue
        group.append(placement.to(batch))
        seen += int(batch[2].shape[0])
        if not private and len(group) < accumulation:
            continue
        step_lr = float(optimizer.param_groups[0]["lr"])
        loss = _step(
            model, optimizer, group, placement, scaler, len(losses), private, prox_mu, anchor
        )
        group = []
        if private and getattr(optimizer, "_is_last_step_skipped", False):
            continue  # a physical batch inside a logical one: Opacus only accumulated it
        losses.append(loss)
        lrs.append(step_lr)
        if scheduler is not None:
            scheduler.step()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if not losses:
        return TrainResult(0, 0, math.nan, math.nan, math.nan)
    return TrainResult(
        steps=len(losses),
        examples_seen=seen,
        mean_loss=sum(losses) / len(losses),
        first_loss=losses[0],
        last_loss=losses[-1],
        lrs=tuple(lrs),
    )


def _step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    group: list[tuple[torch.Tensor, ...]],
    placement: Placement,
    scaler: torch.amp.GradScaler | None,
    index: int,
    private: bool = False,
    prox_mu: float = 0.0,
    anchor: dict[str, torch.Tensor] | None = None,
) -> float:
    """Backward over the micro-batches of ``group`` and one optimizer step; the step's loss."""
    optimizer.zero_grad(set_to_none=True)
    total = sum(int(b[2].shape[0]) for b in group)
    step_loss = 0.0
    for i, (input_ids, attention_mask, labels) in enumerate(group):
        with placement.autocast():
            loss = batch_loss(model, input_ids, attention_mask, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Training loss became {loss.item()} at step {index}")
        share = int(labels.shape[0]) / total
        weighted = loss if len(group) == 1 else loss * share
        if anchor is not None and i == 0:  # once per step, whatever the micro-batches
            weighted = weighted + proximal_term(model, anchor, prox_mu)
        (weighted if scaler is None else scaler.scale(weighted)).backward()
        step_loss += float(loss.detach()) * share
    if private:
        upcast_grad_samples(optimizer)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return step_loss


def proximal_anchor(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as they start (FedProx's w_0), detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def proximal_term(
    model: torch.nn.Module, anchor: dict[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's (mu / 2) sum ||w - w_0||^2 over the anchored parameters (Li et al., 2020)."""
    terms = [
        torch.sum((p.float() - anchor[n].float()) ** 2)
        for n, p in model.named_parameters()
        if n in anchor
    ]
    return 0.5 * mu * torch.stack(terms).sum()


def noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """The DP-SGD step of an empty Poisson batch: noise alone, counted by the accountant.

    Opacus takes it too (its data loader yields an empty batch and the step goes on): the
    accounting of Poisson sampling assumes a step at every draw, empty or not. Skipping it
    would leave the step boundary Opacus's batch splitter queued for this batch, and
    every later logical batch would end one physical chunk late.
    """
    optimizer.zero_grad(set_to_none=True)
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def upcast_grad_samples(optimizer: torch.optim.Optimizer) -> None:
    """Per-sample gradients in the parameters' float32 before Opacus clips them.

    Under bf16 autocast Opacus computes them in bf16 and takes their norms there; a norm
    rounded down by bf16's 2^-9 would let a clipped gradient exceed the clip bound that
    the privacy accounting assumes.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            samples = getattr(p, "grad_sample", None)
            if isinstance(samples, torch.Tensor) and samples.dtype != p.dtype:
                p.grad_sample = samples.to(p.dtype)
            elif isinstance(samples, list):
                p.grad_sample = [g.to(p.dtype) for g in samples]


def batch_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """The training loss: cross-entropy of the class, or (token labels) the causal-LM loss."""
    if labels.dim() == 2:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return example_mean_loss(out.logits, labels)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: TensorDataset,
    batch_size: int,
    desc: str = "eval",
    show_progress: bool = True,
    placement: Placement | None = None,
) -> EvalResult:
    """Mean cross-entropy and accuracy over ``data``.

    With token labels (causal LM): token-mean loss and the greedy answer's exact match.
    """
    placement = placement or Placement()
    if data.tensors[2].dim() == 2:
        loss, exact, count = evaluate_lm(model, data, batch_size, desc, show_progress, placement)
        return EvalResult(loss=loss, accuracy=exact, num_examples=count)
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    total_loss = 0.0
    correct = 0
    count = 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not show_progress, mininterval=2.0):
        input_ids, attention_mask, labels = placement.to(batch)
        with placement.autocast():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
        count += int(labels.shape[0])
    if count == 0:
        return EvalResult(math.nan, math.nan, 0)
    return EvalResult(loss=total_loss / count, accuracy=correct / count, num_examples=count)
