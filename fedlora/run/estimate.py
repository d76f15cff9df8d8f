"""What a run will cost before it starts: parameters, bytes on the wire, device memory.

Everything is computed from the model's structure on PyTorch's ``meta`` device (no
weights are read) and the run config, so ``fedlora estimate`` answers "does this fit?"
for an 8B model on a laptop. The memory model, per client, in bytes:

- **weights**: the frozen base at its precision (fp32 4, bf16/fp16 2), or quantised
  (bitsandbytes NF4 with double quantisation: 4 bits plus 1/64 B of block constants and
  4/(64 x 256) B of their own scales per weight; int8: 1 B) for the linear layers it
  quantises; the embeddings, norms and head at the compute dtype, or in float32 with a
  quantised base (peft's ``prepare_model_for_kbit_training`` casts them). **Twice**: a process
  keeps one loaded base and trains on a copy (:func:`fedlora.model.models.load_base_model`).
- **trainable**: the LoRA factors and the head as float32 master weights, their
  gradients and AdamW's two moments (16 B each).
- **activations**: a transformer layer keeps about ``10 h + 4 i`` values per token
  (``h`` hidden, ``i`` the MLP's width: its norms, projections and gates; fused attention
  stores no score matrix) at the compute dtype's size; with gradient checkpointing only
  each layer's input (``h`` per token) plus one layer's full set. A causal LM adds six
  float32 copies of its logits (``b s V``: the logits, the loss's log-softmax, their
  gradients). Calibrated on CPU in float32 against the growth of resident memory over two
  real steps, batch 16 x 64: for the embedded SmolLM2-135M the estimate was 3% below
  (11% with checkpointing); for the small embedded encoder it misses a fixed ~120 MiB of
  CPU allocator overhead. ``simulations/gpu_check.py`` checks it on a GPU.
- **DP-SGD**: Opacus's per-sample gradients, one float32 copy of the trainable
  parameters per example of the physical batch.

An estimate, not a measurement: allocator fragmentation, CUDA's context (some hundred MiB)
and kernels' workspaces come on top. ``simulations/gpu_check.py`` compares it with
``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedlora.config import CAUSAL_LM, RunConfig
from fedlora.wire.codec import Codec, encode_tensor

GIB = 1024**3
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values, 8-bit absmax per 64, fp32 per 256
INT8_BYTES = 1.0
LOGIT_COPIES = 6  # float32 logits, log-softmax, and their gradients
HEAD_NAMES = ("lm_head", "classifier", "score")  # never quantised


@dataclass(frozen=True)
class Estimate:
    """One client's costs for a run config (bytes unless named otherwise)."""

    parameters: int
    quantised_parameters: int
    trainable_parameters: int
    layers: int
    hidden: int
    vocab: int
    compute_bytes: int  # bytes per value of the compute dtype
    weights: float
    trainable: float
    activations: float
    dp_per_sample: float
    wire_dense: int
    wire_uplink: int

    @property
    def total(self) -> float:
        """The estimated peak device memory of one client's training."""
        return self.weights + self.trainable + self.activations + self.dp_per_sample

    def rows(self) -> list[tuple[str, str]]:
        """The estimate as (item, value) rows for a table."""
        share = self.trainable_parameters / max(self.parameters, 1)
        return [
            ("parameters", f"{self.parameters / 1e6:,.1f} M"),
            ("of which quantised", f"{self.quantised_parameters / 1e6:,.1f} M"),
            ("trainable (LoRA + head)", f"{self.trainable_parameters:,} ({share:.3%})"),
            ("adapter on the wire, dense fp32", _size(self.wire_dense)),
            ("adapter on the wire, uplink codec", _size(self.wire_uplink)),
            ("weights (loaded + working copy)", _size(self.weights)),
            ("trainable + grads + AdamW", _size(self.trainable)),
            ("activations", _size(self.activations)),
            ("DP per-sample gradients", _size(self.dp_per_sample)),
            ("device memory per client (estimate)", _size(self.total)),
        ]


def _size(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 1024**2:.1f} MiB"


def compute_bytes(cfg: RunConfig) -> int:
    """Bytes of the compute dtype: ``auto`` is bf16 where a CUDA device will be used."""
    if cfg.precision in ("bf16", "fp16"):
        return 2
    if cfg.precision == "fp32":
        return 4
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    return 2 if cuda else 4


def estimate(cfg: RunConfig, num_labels: int = 2) -> Estimate:
    """The costs of one client's training under ``cfg`` (see the module docstring)."""
    from fedlora.run.preflight import skeleton

    model = skeleton(cfg, num_labels)
    base_params, quantised, trainable = 0, 0, 0
    adapter_shapes: list[tuple[int, ...]] = []
    for name, p in model.named_parameters():  # tied weights once
        if p.requires_grad:  # the LoRA factors and the head (float32 master weights)
            trainable += p.numel()
            adapter_shapes.append(tuple(p.shape))
            continue
        base_params += p.numel()
        owner = model.get_submodule(name.rpartition(".")[0])
        linear = isinstance(owner, torch.nn.Linear) and p.dim() == 2
        if linear and not any(h in name for h in HEAD_NAMES):
            quantised += p.numel()  # what bitsandbytes would replace
    config = model.get_base_model().config
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    width = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 0)
    width = width or 4 * hidden
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
    vocab = int(getattr(config, "vocab_size", 0))
    cb = compute_bytes(cfg)
    if cfg.base_quantization == "none":
        quantised = 0
    per_quantised = {"none": cb, "8bit": INT8_BYTES, "4bit": NF4_BYTES}[cfg.base_quantization]
    # peft's k-bit preparation casts what it does not quantise (embeddings, norms, head)
    # to float32
    rest = 4 if cfg.base_quantization != "none" else cb
    weights = 2 * (quantised * per_quantised + (base_params - quantised) * rest)
    tokens = cfg.batch_size * cfg.max_seq_len
    per_layer = tokens * (10 * hidden + 4 * width) * cb
    if cfg.gradient_checkpointing:
        acts = layers * tokens * hidden * cb + per_layer
    else:
        acts = layers * per_layer
    if cfg.task == CAUSAL_LM:
        acts += LOGIT_COPIES * tokens * vocab * 4
    dp = cfg.batch_size * trainable * 4 if cfg.dp else 0
    dense = 4 * trainable
    uplink = sum(_encoded_bytes(shape, cfg.uplink) for shape in adapter_shapes)
    return Estimate(
        parameters=base_params,
        quantised_parameters=quantised,
        trainable_parameters=trainable,
        layers=layers,
        hidden=hidden,
        vocab=vocab,
        compute_bytes=cb,
        weights=float(weights),
        trainable=16.0 * trainable,
        activations=float(acts),
        dp_per_sample=float(dp),
        wire_dense=dense,
        wire_uplink=uplink,
    )


def _encoded_bytes(shape: tuple[int, ...], codec: Codec) -> int:
    """Bytes of one tensor of ``shape`` encoded with ``codec`` (the codec's own encoder)."""
    if codec.identity:
        return 4 * int(np.prod(shape))
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    return sum(int(v.nbytes) for v in encode_tensor(x, codec).values())


def summary_line(e: Estimate) -> str:
    """One line for ``simulate``'s pre-flight."""
    return (
        f"estimate: {e.parameters / 1e6:,.1f} M parameters, {e.trainable_parameters:,} "
        f"trainable; adapter {_size(e.wire_uplink)} per reply; about {_size(e.total)} of "
        "device memory per client (fedlora estimate for the breakdown)"
    )
