"""Adapter state in and out of a peft model (the one place torch meets :mod:`fedlora.lora`)."""

from __future__ import annotations

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from fedlora.lora.state import AdapterError, AdapterState, state_from_dict


def state_from_peft(model: PeftModel, scaling: float) -> AdapterState:
    """Read the trainable adapter (LoRA + modules_to_save) out of a peft model."""
    sd = get_peft_model_state_dict(model)
    return state_from_dict(
        {k: v.detach().to(torch.float32).cpu().numpy().copy() for k, v in sd.items()}, scaling
    )


def load_into_peft(model: PeftModel, state: AdapterState) -> None:
    """Write ``state`` into ``model``; every key and shape must match exactly."""
    current = get_peft_model_state_dict(model)
    incoming = state.to_state_dict()
    missing = sorted(set(current) - set(incoming))
    extra = sorted(set(incoming) - set(current))
    if missing or extra:
        raise AdapterError(
            f"Adapter keys do not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for key, value in incoming.items():
        if tuple(current[key].shape) != value.shape:
            raise AdapterError(
                f"Tensor '{key}' has shape {value.shape}, the model expects "
                f"{tuple(current[key].shape)}"
            )
    dtype = next(iter(current.values())).dtype
    result = set_peft_model_state_dict(
        model, {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in incoming.items()}
    )
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AdapterError(f"peft did not recognise keys {unexpected[:3]}")
