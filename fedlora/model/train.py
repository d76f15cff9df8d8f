"""Local training and evaluation loops: plain PyTorch, a progress bar, nothing hidden."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from tqdm.auto import tqdm

from fedlora.model.lm import evaluate_lm, example_mean_loss


@dataclass(frozen=True)
class TrainResult:
    """What one local round produced."""

    steps: int
    examples_seen: int
    mean_loss: float
    first_loss: float
    last_loss: float


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
    generator = torch.Generator().manual_seed(seed)
    num_samples = steps * batch_size
    sampler = RandomSampler(
        data, replacement=num_samples > len(data), num_samples=num_samples, generator=generator
    )
    return DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=False)


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    desc: str = "train",
    show_progress: bool = True,
) -> TrainResult:
    """One pass over ``loader``: forward, backward, step. Returns the loss trajectory."""
    model.train()
    losses: list[float] = []
    seen = 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not show_progress, mininterval=2.0)
    for batch in bar:
        if batch is None:  # an empty Poisson batch (DP-SGD): nothing to learn from
            continue
        input_ids, attention_mask, labels = batch
        optimizer.zero_grad(set_to_none=True)
        loss = batch_loss(model, input_ids, attention_mask, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Training loss became {loss.item()} at step {len(losses)}")
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        seen += int(labels.shape[0])
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if not losses:
        return TrainResult(0, 0, math.nan, math.nan, math.nan)
    return TrainResult(
        steps=len(losses),
        examples_seen=seen,
        mean_loss=sum(losses) / len(losses),
        first_loss=losses[0],
        last_loss=losses[-1],
    )


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
) -> EvalResult:
    """Mean cross-entropy and accuracy over ``data``.

    With token labels (causal LM): token-mean loss and the greedy answer's exact match.
    """
    if data.tensors[2].dim() == 2:
        loss, exact, count = evaluate_lm(model, data, batch_size, desc, show_progress)
        return EvalResult(loss=loss, accuracy=exact, num_examples=count)
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    total_loss = 0.0
    correct = 0
    count = 0
    for input_ids, attention_mask, labels in tqdm(
        loader, desc=desc, leave=False, disable=not show_progress, mininterval=2.0
    ):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
        count += int(labels.shape[0])
    if count == 0:
        return EvalResult(math.nan, math.nan, 0)
    return EvalResult(loss=total_loss / count, accuracy=correct / count, num_examples=count)
