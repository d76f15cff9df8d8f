"""The mean loss gradient of each LoRA layer's frozen base weight (LoRA-SB's calibration).

LoRA-SB (and Fed-SB after it) initialises its fixed bases from the first step full
fine-tuning would take, so a node is asked for the gradient full fine-tuning would see:
d loss / d W0 of every adapted weight, averaged over a few of its training examples.
With B = 0 the adapter adds nothing, so this is the base model's own gradient.

The gradient of a linear map y = x W0^T is dy^T x, summed over the tokens. It is collected
from hooks on the base layers' inputs x and output gradients dy, not from W0.grad, so a
quantised base (bitsandbytes' 4-bit or 8-bit weights, which have no float gradient)
calibrates as a float one does. The cost is one float32 d_out x d_in sum per
adapted layer, on the model's device until the end: 8x a 4-bit weight, which is what the
reply carries anyway. Calibration runs in eval mode, so without gradient checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from fedlora.lora.state import GRAD_SUFFIX
from fedlora.model.device import Placement
from fedlora.model.train import batch_loss

ForwardHook = Callable[[torch.nn.Module, tuple, torch.Tensor], None]


def adapted_base_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Each LoRA layer's base layer, keyed as the adapter state keys its module.

    Linear layers (also bitsandbytes' quantised ones, which subclass ``nn.Linear``) and
    GPT-2's ``Conv1D`` are supported; a LoRA embedding or convolution has no d_out x d_in
    gradient of this kind and is refused by name.
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if not isinstance(base, torch.nn.Linear | Conv1D):
                raise ValueError(
                    f"Cannot calibrate '{name}': its base layer is a {type(base).__name__}, "
                    "and only linear layers (nn.Linear, bitsandbytes' Linear4bit/8bitLt, "
                    "Conv1D) have the d_out x d_in weight gradient LoRA-SB starts from"
                )
            out[name] = base
    if not out:
        raise ValueError("The model has no LoRA layer whose base weight could be calibrated")
    return out


def mean_base_gradients(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    placement: Placement | None = None,
) -> tuple[dict[str, np.ndarray], int, float]:
    """(gradients keyed ``<module>.base_grad``, each d_out x d_in; examples seen; mean loss).

    Each batch's mean loss is weighted by its size, so the result is the gradient of the
    mean loss over all the examples. No parameter's ``requires_grad`` or ``.grad`` changes:
    the graph is rooted at the input embeddings' output instead, which makes every
    activation, and so every base layer's output, take a gradient.
    """
    placement = placement or Placement()
    layers = adapted_base_layers(model)
    sums: dict[str, torch.Tensor] = {}

    def collect(name: str) -> ForwardHook:
        def on_forward(_module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not output.requires_grad:
                raise ValueError(
                    f"Cannot calibrate '{name}': its output does not depend on the input "
                    "embeddings' output (a model fed inputs_embeds, or a decoder with "
                    "embeddings of its own?), so no gradient reaches it"
                )
            x = inputs[0].detach()

            def on_grad(dy: torch.Tensor) -> None:
                dy2, x2 = dy.reshape(-1, dy.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
                if name not in sums:
                    sums[name] = torch.zeros(dy2.shape[1], x2.shape[1], device=dy.device)
                sums[name].addmm_(dy2.T, x2)  # in place: one d_out x d_in buffer per layer

            output.register_hook(on_grad)

        return on_forward

    roots: list[torch.Tensor] = []

    def root(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        roots.append(output.requires_grad_(True))

    handles: list[RemovableHandle] = [model.get_input_embeddings().register_forward_hook(root)]
    handles += [layer.register_forward_hook(collect(n)) for n, layer in layers.items()]
    seen, loss_sum = 0, 0.0
    training = model.training
    model.eval()  # no dropout: the gradient of the model as it is
    try:
        for batch in batches:
            input_ids, attention_mask, labels = placement.to(batch)
            n = int(labels.shape[0])
            with placement.autocast():
                loss = batch_loss(model, input_ids, attention_mask, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Calibration loss became {loss.item()}")
            # The batch's sum (the mean over all batches at the end); differentiated with
            # respect to the root only, so no parameter's .grad is touched.
            torch.autograd.grad(loss * n, roots)
            roots.clear()
            seen += n
            loss_sum += float(loss.detach()) * n
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    if seen == 0:
        raise ValueError("Calibration saw no examples")
    missing = sorted(set(layers) - set(sums))
    if missing:
        raise ValueError(f"Calibration reached no gradient for {missing[:3]}")
    return (
        {name + GRAD_SUFFIX: (sums[name] / seen).cpu().numpy() for name in layers},
        seen,
        loss_sum / seen,
    )
