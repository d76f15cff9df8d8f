"""The mean loss gradient of each LoRA layer's frozen base weight (LoRA-SB's calibration).

LoRA-SB (and Fed-SB after it) initialises its fixed bases from the first step full
fine-tuning would take, so a node is asked for the gradient full fine-tuning would see:
d loss / d W0 of every adapted weight, averaged over a few of its training examples.
With B = 0 the adapter adds nothing, so this is the base model's own gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from peft.tuners.lora import LoraLayer

from fedlora.lora.state import GRAD_SUFFIX
from fedlora.model.device import Placement
from fedlora.model.train import batch_loss


def adapted_base_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Each LoRA layer's base weight, keyed as the adapter state keys its module."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weight = getattr(module.get_base_layer(), "weight", None)
            if not isinstance(weight, torch.nn.Parameter) or not weight.is_floating_point():
                raise ValueError(
                    f"Cannot take the gradient of '{name}''s base weight "
                    f"({type(weight).__name__}): a quantised base has no float weight; "
                    "calibrate with base-quantization=none"
                )
            out[name] = weight
    if not out:
        raise ValueError("The model has no LoRA layer whose base weight could be calibrated")
    return out


def mean_base_gradients(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    placement: Placement | None = None,
) -> tuple[dict[str, np.ndarray], int, float]:
    """(gradients keyed ``<module>.base_grad``, examples seen, mean loss).

    Each batch's mean loss is weighted by its size, so the result is the gradient of the
    mean loss over all the examples. Only the base weights take gradients here, and each
    is frozen again afterwards, whatever happens.
    """
    placement = placement or Placement()
    weights = adapted_base_weights(model)
    before = {p: p.requires_grad for p in model.parameters()}
    sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    seen, loss_sum = 0, 0.0
    model.eval()  # no dropout: the gradient of the model as it is
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            input_ids, attention_mask, labels = placement.to(batch)
            n = int(labels.shape[0])
            with placement.autocast():
                loss = batch_loss(model, input_ids, attention_mask, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Calibration loss became {loss.item()}")
            grads = torch.autograd.grad(loss, list(weights.values()))
            for name, g in zip(weights, grads, strict=True):
                sums[name] += g.float() * n
            seen += n
            loss_sum += float(loss.detach()) * n
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)
    if seen == 0:
        raise ValueError("Calibration saw no examples")
    out = {name + GRAD_SUFFIX: (s / seen).cpu().numpy() for name, s in sums.items()}
    return out, seen, loss_sum / seen
