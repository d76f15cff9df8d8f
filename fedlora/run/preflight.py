"""Checks that need the model, run before any Flower process starts.

A wrong model path, LoRA targets that match nothing, or a rank larger than the layers
it adapts would otherwise surface inside the ServerApp, after the SuperLink and Ray had
started. The model is built on PyTorch's ``meta`` device: its structure, no weights
(a fraction of a second for the embedded encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from fedlora.config import BUILTIN_DATASETS, CAUSAL_LM, ConfigError, RunConfig
from fedlora.config.values import offline_hint


@dataclass(frozen=True)
class AdaptedLayer:
    """One layer that receives LoRA: its module path and its (d_out, d_in)."""

    name: str
    d_out: int
    d_in: int


def adapted_layers(model: PeftModel) -> list[AdaptedLayer]:
    """Every LoRA layer of a peft model with its base layer's shape."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out.append(AdaptedLayer(name, int(module.out_features), int(module.in_features)))
    return out


def check_rank_fits(layers: list[AdaptedLayer], rank: int) -> None:
    """Refuse a rank above min(d_out, d_in) of some adapted layer, naming the layer.

    Such a LoRA has more parameters than the layer it adapts and no more expressive
    power: it is a configuration error, not a choice.
    """
    if not layers:
        return
    smallest = min(layers, key=lambda layer: min(layer.d_out, layer.d_in))
    limit = min(smallest.d_out, smallest.d_in)
    if rank > limit:
        raise ConfigError(
            f"Invalid value for 'lora-rank': {rank} exceeds {limit}, the smaller dimension of "
            f"'{smallest.name}' ({smallest.d_out} x {smallest.d_in}); a rank above "
            "min(d_out, d_in) adds parameters and no expressive power"
        )


def skeleton(cfg: RunConfig, num_labels: int = 2) -> PeftModel:
    """The run's LoRA model on the meta device (no weights): targets and shapes only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedlora.model.models import attach_lora, lora_spec, resolve_model_path

    path = resolve_model_path(cfg.model, cfg.task)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        hint = offline_hint(
            cfg.model,
            f"download it once with `huggingface-cli download {cfg.model} --local-dir DIR` "
            "and pass model=DIR",
        )
        raise ConfigError(
            f"Invalid value for 'model': {cfg.model!r} cannot be loaded ({err}){hint}"
        ) from None
    with torch.device("meta"):
        if cfg.task == CAUSAL_LM:
            base = AutoModelForCausalLM.from_config(config)
        else:
            config.num_labels = num_labels
            base = AutoModelForSequenceClassification.from_config(config)
        return attach_lora(base, lora_spec(cfg), seed=cfg.seed)


def check_paths(cfg: RunConfig) -> None:
    """The files the server will read exist where this command runs.

    Not part of the run configuration's own checks: a node that brings its own data file
    must not be refused because the server's dataset is not on its machine.
    """
    if cfg.dataset not in BUILTIN_DATASETS:
        from fedlora.data.files import is_hub_dataset

        if not Path(cfg.dataset).expanduser().is_file() and not is_hub_dataset(cfg.dataset):
            raise ConfigError(
                f"Invalid value for 'dataset': {cfg.dataset!r} is neither a file, a dataset "
                "folder nor a hub id (user/name)"
            )
        from fedlora.data.tables import load_table

        load_table(cfg.data)  # its columns: a missing one is named now, not in the ServerApp
    check_output_dir(cfg.output_dir)


def check_output_dir(output_dir: str) -> None:
    """The output folder can be created: no part of its path is a regular file."""
    path = Path(output_dir).expanduser().resolve()
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"Invalid value for 'output-dir': {output_dir!r} cannot be created: "
                    f"{str(parent)!r} is a file"
                )
            return


def check_model(cfg: RunConfig) -> list[AdaptedLayer]:
    """Model, LoRA targets and rank, checked on the skeleton; returns the adapted layers."""
    model = skeleton(cfg)
    positions = getattr(model.get_base_model().config, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.max_seq_len > positions:
        raise ConfigError(
            f"Invalid value for 'max-seq-len': {cfg.max_seq_len} exceeds the model's "
            f"{positions} positions (max_position_embeddings)"
        )
    layers = adapted_layers(model)
    check_rank_fits(layers, cfg.lora_rank)
    return layers


def check_accelerators(cfg: RunConfig, local: bool) -> None:
    """The quantisation library is installed; with ``local``, the device is here too.

    ``local``: this machine trains (simulate, deploy-local). A remote deployment's nodes
    resolve ``device`` on their own machines (and may override it in their node-config).
    """
    from fedlora.model.device import Placement
    from fedlora.model.models import quantization_config

    placement = Placement.resolve(cfg.device, cfg.precision) if local else None
    if cfg.base_quantization != "none":
        dtype = placement.dtype if placement is not None else torch.bfloat16
        quantization_config(cfg.base_quantization, dtype, cfg.task)
