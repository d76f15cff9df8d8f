"""LoRA with a trainable r x r core: dW = s B R A (LoRA-XS / LoRA-SB, used by Fed-SB).

peft 0.21 has no such layer (its TinyLoRA, after LoRA-XS, builds A and B from the SVD of
the frozen weight and trains a small vector projected into R; not this). So the core is
added on top of peft's own LoRA ``Linear`` layers, through peft's documented extension
point for variants (``LoraLayer.lora_variant``, the hook DoRA uses):

- each adapted layer gets a ``lora_R`` ModuleDict holding ``nn.Linear(r, r, bias=False)``
  per adapter, its weight being R (zero at first, so the adapter starts as the identity);
- ``"lora_R"`` joins the layer's ``adapter_layer_names``, so peft's adapter switching,
  ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` and the ``lora_`` prefix
  that marks trainable parameters treat it like ``lora_A`` and ``lora_B``: its key in a
  peft state dict is ``<module>.lora_R.weight`` (:data:`fedlora.lora.state.CORE_SUFFIX`);
- the layer's variant (:class:`CoreVariant`) computes ``result + s B(R(A(dropout(x))))``
  and merges ``s B R A`` into the base weight.

R is a plain ``nn.Linear`` called as a module, so Opacus's per-sample gradient hooks
(``GradSampleModule``) see it like any other linear layer: DP-SGD clips and noises R's
per-example gradients, and A and B, frozen, get none.

A model with a core is what a node trains. What the server keeps, evaluates and exports
is a standard LoRA adapter with R folded into B (B' = B R, the same product;
:func:`fedlora.strategies.fed_sb.fold`), which ``PeftModel.from_pretrained`` loads with
nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils.other import transpose

CORE = "lora_R"
"""Name of the ModuleDict that holds each adapter's core R on a LoRA layer."""


def _delta(module: LoraLayer, adapter: str) -> torch.Tensor:
    """The delta s B R A of ``adapter`` on ``module``, in the base weight's layout."""
    a = module.lora_A[adapter].weight
    r = getattr(module, CORE)[adapter].weight
    b = module.lora_B[adapter].weight
    delta = b.float() @ r.float() @ a.float()
    return transpose(delta, module.fan_in_fan_out) * module.scaling[adapter]


class CoreVariant(LoraVariant):
    """peft's variant hook for LoRA with a core: forward and merge of s B R A."""

    def supports_lora_conversion(self) -> bool:
        """Refuse peft's own LoRA conversion: it would read B A without R."""
        return False

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        """Nothing: :func:`attach_core` creates R after peft built the layer."""

    @staticmethod
    def merge_safe(
        module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor
    ) -> torch.Tensor:
        """W0 + s B R A, as a new tensor."""
        return orig_weight + _delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        """W0 += s B R A, in place."""
        orig_weight.data += _delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """W0 - s B R A."""
        return orig_weight - _delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: LoraLayer,
        active_adapter: str,
        x: torch.Tensor,
        result: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The base result plus s B(R(A(dropout(x))))."""
        dropout = module.lora_dropout[active_adapter]
        core = getattr(module, CORE)[active_adapter]
        down = module.lora_A[active_adapter](dropout(x))
        return result + module.lora_B[active_adapter](core(down)) * module.scaling[active_adapter]


def attach_core(model: PeftModel, adapter: str = "default") -> int:
    """Give every LoRA layer of ``model``'s ``adapter`` a trainable core R = 0; the count.

    Only peft's LoRA ``Linear`` layers are supported (attention and MLP projections, also
    bitsandbytes' quantised ones, which subclass it); a LoRA embedding or convolution, or
    a layer that already has a variant (DoRA), is refused rather than trained wrongly.
    """
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if not isinstance(module, LoraLinear) or adapter in module.lora_variant:
            what = "a variant (DoRA?)" if isinstance(module, LoraLinear) else type(module).__name__
            raise ValueError(
                f"Cannot give '{name}' a LoRA core: only plain LoRA Linear layers take one "
                f"(this one is {what})"
            )
        a = module.lora_A[adapter].weight
        rank = int(a.shape[0])
        if not hasattr(module, CORE):
            module.lora_R = torch.nn.ModuleDict()
            module.adapter_layer_names = (*module.adapter_layer_names, CORE)
        core = torch.nn.Linear(rank, rank, bias=False, device=a.device, dtype=torch.float32)
        torch.nn.init.zeros_(core.weight)
        getattr(module, CORE)[adapter] = core
        module.lora_variant[adapter] = CoreVariant()
        count += 1
    if count == 0:
        raise ValueError(f"Cannot attach a LoRA core: the model has no LoRA layer of '{adapter}'")
    return count
