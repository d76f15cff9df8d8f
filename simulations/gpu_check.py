"""The accelerator checks of docs/gpu.md, on one CUDA GPU: throughput, memory, DP, sharing.

Run by ``simulations/gpu_check.sh`` (which installs what the machine lacks from wheels);
``python simulations/gpu_check.py --part NAME`` runs one part. Every figure printed is
measured here, on this machine, in this run; nothing is read from elsewhere. The model
is a Llama built from a config with random weights (throughput needs no pretrained
weights): about 0.5B parameters by default.

Parts:

- ``loop``: client training tokens/s, fedlora's loop (``train_steps`` on a model from
  ``build_lora_model``) against a plain PEFT bf16 loop on the same batches, without and
  with gradient checkpointing and with a 4-bit base; the peak device memory of each
  against ``fedlora estimate``;
- ``dp``: a DP-SGD step (Opacus) against a plain step, same model and batch size;
- ``federation``: a 2-round simulation of 4 clients sharing the GPU
  (``--gpus-per-client 0.25``, 4 CPUs so all 4 run at once), with each client's device
  memory at the start of each round (flat: a client does not grow over rounds). The
  ServerApp's evaluation holds its own base on the same GPU, outside Ray's accounting.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedlora.config import RunConfig

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH, WARMUP, TIMED = 512, 8, 3, 10


VOCAB = 49152  # the embedded SmolLM2 tokenizer's


def build_model(folder: Path, hidden: int, layers: int) -> Path:
    """A Llama of random weights with the embedded SmolLM2 tokenizer, saved as a folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedlora.model.embedded_decoder import DECODER_PACKAGE, GGUF_FILE
    from fedlora.model.models import package_dir

    tokenizer = AutoTokenizer.from_pretrained(package_dir(DECODER_PACKAGE), gguf_file=GGUF_FILE)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: Llama, hidden {hidden}, {layers} layers, {params / 1e9:.2f} B parameters")
    return folder


def batches(count: int, vocab: int = VOCAB) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        labels = ids.clone()
        labels[:, : SEQ // 4] = -100
        out.append((ids, torch.ones_like(ids), labels))
    return out


def _run_config(model: Path, **extra: object) -> RunConfig:
    return RunConfig(
        task="causal-lm",
        model=str(model),
        device="cuda",
        precision="bf16",
        lora_targets="q_proj,k_proj,v_proj,o_proj",
        lora_rank=16,
        lora_alpha=32.0,
        batch_size=BATCH,
        max_seq_len=SEQ,
        **extra,
    )


def fedlora_loop(
    model_dir: Path, data: list[Batch], checkpointing: bool, quantization: str
) -> tuple[float, float]:
    """fedlora's client loop: tokens/s and peak MiB."""
    from fedlora.model.device import Placement, release
    from fedlora.model.models import BaseLoading, build_lora_model, lora_spec
    from fedlora.model.train import make_optimizer, train_steps

    cfg = _run_config(
        model_dir, gradient_checkpointing=checkpointing, base_quantization=quantization
    )
    placement = Placement.resolve("cuda", "bf16")
    gc.collect()  # what the plain loop left must not count as this loop's peak
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_lora_model(
        cfg.model, 0, lora_spec(cfg), seed=0, loading=BaseLoading(placement, quantization)
    )
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(model, 1e-4)
    train_steps(model, optimizer, data[:WARMUP], show_progress=False, placement=placement)
    torch.cuda.synchronize()
    started = time.perf_counter()
    train_steps(model, optimizer, data[WARMUP:], show_progress=False, placement=placement)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model, optimizer
    release(torch.device("cuda"))
    from fedlora.model import models

    models._BASE_CACHE.clear()
    release(torch.device("cuda"))
    return TIMED * BATCH * SEQ / seconds, peak


def plain_loop(model_dir: Path, data: list[Batch], checkpointing: bool, quantization: str) -> float:
    """The reference: transformers + peft + AdamW under bf16 autocast, written plainly."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16, "device_map": {"": 0}}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    base = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantization == "4bit":
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(
        base,
        LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(batch: Batch, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        ids, mask, labels = (t.cuda(non_blocking=True) for t in batch)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()

    for batch in data[:WARMUP]:
        step(batch, model, optimizer)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in data[WARMUP:]:
        step(batch, model, optimizer)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del model, optimizer, base
    gc.collect()
    torch.cuda.empty_cache()
    return TIMED * BATCH * SEQ / seconds


def part_loop(model_dir: Path) -> None:
    from fedlora.run.estimate import estimate

    data = batches(WARMUP + TIMED)
    print(f"\nclient loop, batch {BATCH} x {SEQ} tokens, bf16, LoRA r=16 on q/k/v/o")
    print(
        "| setting | plain tokens/s | fedlora tokens/s | ratio | peak MiB | estimate MiB "
        "| peak / estimate |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, ckpt, quant in (
        ("bf16 base", False, "none"),
        ("bf16 base + checkpointing", True, "none"),
        ("4-bit base", False, "4bit"),
    ):
        plain = plain_loop(model_dir, data, ckpt, quant)
        ours, peak = fedlora_loop(model_dir, data, ckpt, quant)
        est = (
            estimate(
                _run_config(model_dir, gradient_checkpointing=ckpt, base_quantization=quant)
            ).total
            / 2**20
        )
        print(
            f"| {name} | {plain:,.0f} | {ours:,.0f} | {ours / plain:.3f} | {peak:,.0f} | "
            f"{est:,.0f} | {peak / est:.2f} |",
            flush=True,
        )


def part_dp(model_dir: Path) -> None:
    from torch.utils.data import TensorDataset

    from fedlora.model.device import Placement
    from fedlora.model.models import BaseLoading, build_lora_model, lora_spec
    from fedlora.model.train import make_optimizer, train_steps
    from fedlora.privacy.dp_sgd import PrivacyBudget, make_private

    cfg = _run_config(model_dir)
    placement = Placement.resolve("cuda", "bf16")
    data = batches(WARMUP + TIMED)
    ids = torch.cat([b[0] for b in data])
    pool = TensorDataset(ids, torch.ones_like(ids), torch.cat([b[2] for b in data]))
    times = {}
    for private in (False, True):
        model = build_lora_model(
            cfg.model, 0, lora_spec(cfg), seed=0, loading=BaseLoading(placement)
        )
        optimizer = make_optimizer(model, 1e-4)
        if private:
            budget = PrivacyBudget("rdp", 1.0, BATCH / len(pool), 1e-5, float("inf"))
            wrapped = make_private(
                model,
                optimizer,
                pool,
                budget=budget,
                clip_norm=1.0,
                steps=WARMUP + TIMED,
                device=placement.device,
            )
            loop_model, loop_opt, loader = wrapped.model, wrapped.optimizer, list(wrapped.loader)
        else:
            loop_model, loop_opt, loader = model, optimizer, data
        train_steps(
            loop_model,
            loop_opt,
            loader[:WARMUP],
            show_progress=False,
            placement=placement,
            private=private,
        )
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = train_steps(
            loop_model,
            loop_opt,
            loader[WARMUP:],
            show_progress=False,
            placement=placement,
            private=private,
        )
        torch.cuda.synchronize()
        times[private] = (time.perf_counter() - started) / max(result.steps, 1)
        del model, optimizer, loop_model, loop_opt
        torch.cuda.empty_cache()
    print(
        f"\nDP-SGD step / plain step (batch {BATCH} x {SEQ}, bf16): "
        f"{times[True] / times[False]:.2f}"
    )


def part_federation(model_dir: Path) -> None:
    out = Path(tempfile.mkdtemp(prefix="gpu-check-run-"))
    command = [
        sys.executable, "-m", "fedlora.run.cli", "simulate",
        "--supernodes", "4", "--gpus-per-client", "0.25", "--cpus", "4",
        "--output-dir", str(out),
        "-c", "task=causal-lm", "-c", f"model={model_dir}", "-c", "dataset=chatterbot",
        "-c", "num-server-rounds=2", "-c", "clients-per-round=4", "-c", "min-replies=4",
        "-c", "local-steps=5", "-c", "batch-size=4", "-c", "max-seq-len=256",
        "-c", "lora-targets=q_proj,v_proj", "-c", "eval-examples=50",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    print(
        f"\n2-round simulation, 4 clients at 0.25 GPU each: {time.perf_counter() - started:.0f} s"
    )
    print("| round | node | device MiB at start | peak MiB |")
    print("|---|---|---|---|")
    for line in (out / "rounds.jsonl").read_text().splitlines():
        record = json.loads(line)
        for node in record.get("nodes", []):
            print(
                f"| {record['round']} | {node['node_id']} | {node.get('device_mib_start', 'n/a')} "
                f"| {node.get('device_mib_peak', 'n/a')} |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("loop", "dp", "federation", "all"), default="all")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to measure", file=sys.stderr)
        return 2
    print(
        f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}; {time.strftime('%Y-%m-%d')}"
    )
    model_dir = build_model(
        Path(tempfile.mkdtemp(prefix="gpu-check-model-")), args.hidden, args.layers
    )
    parts = ("loop", "dp", "federation") if args.part == "all" else (args.part,)
    for part in parts:
        started = time.perf_counter()
        {"loop": part_loop, "dp": part_dp, "federation": part_federation}[part](model_dir)
        print(f"({part}: {time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
