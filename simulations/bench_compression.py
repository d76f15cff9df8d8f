"""Benchmark: bytes and codec time of compressed updates against dense float32, on MiniLM.

    .venv/bin/python simulations/bench_compression.py [--reps 3] [--steps 20]

One real client round (the embedded MiniLM + LoRA r=8 on query,value + head, the
default batch size and sequence length, ``--steps`` local steps on partition ``rep`` of
the default 20 Newsgroups split) gives a real update.
Every codec setting then encodes that update as a node's reply, and the server decodes
it, in this process, side by side. Bytes are the protobuf size Flower puts on the wire
(``fedlora.wire.records.wire_bytes``); the ratio is the tensors' dense float32 size
(4 bytes per entry, the reference the run summaries use) over those bytes. "Energy
kept" is 1 - ||u - C(u)||^2 / ||u||^2 for the update u the node sends (trained -
start): the share of the update one round delivers, the rest waiting in the
error-feedback residual. Codec time is reported as a fraction of the round's training
time. Each repetition trains a new round; min and median over repetitions are printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fedlora.config import RunConfig
from fedlora.data.tables import load_table, partition, tokenize
from fedlora.model.models import build_lora_model, load_tokenizer, lora_spec
from fedlora.model.peft_state import state_from_peft
from fedlora.model.train import make_optimizer, sampled_loader, train_steps
from fedlora.wire.codec import Codec, dense_bytes
from fedlora.wire.links import decode_uplink, encode_uplink
from fedlora.wire.records import to_arrayrecord, wire_bytes

SETTINGS = [
    *(Codec(d, v) for d in (1.0, 0.1, 0.05, 0.01) for v in ("fp32", "int8")),
    Codec(1.0, "sign"),
    Codec(0.1, "sign"),
]


def one_round(cfg: RunConfig, steps: int, seed: int) -> tuple[dict, dict, float]:
    """Start tensors, trained tensors and training seconds of one local round."""
    torch.manual_seed(seed)
    spec = lora_spec(cfg)
    table = load_table(cfg.data)
    model = build_lora_model(cfg.model, table.num_labels, spec, seed=seed)
    start = state_from_peft(model, spec.scaling).to_state_dict()
    frame = partition(table.train, cfg.data, seed % cfg.num_partitions, cfg.num_partitions)
    data = tokenize(frame, load_tokenizer(cfg.model, cfg.task), cfg.max_seq_len, cfg.task)
    loader = sampled_loader(data, cfg.batch_size, steps, seed)
    optimizer = make_optimizer(model, cfg.lr)
    started = time.perf_counter()
    train_steps(model, optimizer, loader, desc="train", show_progress=False)
    seconds = time.perf_counter() - started
    return start, state_from_peft(model, spec.scaling).to_state_dict(), seconds


def measure(start: dict, trained: dict, codec: Codec) -> dict[str, float]:
    """Bytes and codec seconds of one reply under ``codec``."""
    shapes = {k: v.shape for k, v in trained.items()}
    began = time.perf_counter()
    if codec.identity:
        wire = dict(trained)
    else:
        wire, _ = encode_uplink(trained, start, {}, codec)
    encoded = time.perf_counter()
    record = to_arrayrecord(wire)
    serialised = time.perf_counter()
    received = trained if codec.identity else decode_uplink(wire, shapes, start)
    decoded = time.perf_counter()
    update = np.concatenate([(trained[k] - start[k]).ravel() for k in start])
    error = np.concatenate([(trained[k] - received[k]).ravel() for k in start])
    return {
        "energy_kept": 1.0 - float(error @ error) / float(update @ update),
        "bytes": wire_bytes(record),
        "dense_fp32": dense_bytes(shapes.values()),
        "encode_s": encoded - began,
        "record_s": serialised - encoded,
        "decode_s": decoded - serialised,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write the raw numbers as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = RunConfig()
    rows: dict[str, list[dict]] = {}
    for rep in range(args.reps):
        start, trained, train_s = one_round(cfg, args.steps, seed=rep)
        for codec in SETTINGS:
            m = measure(start, trained, codec) | {"train_s": train_s}
            rows.setdefault(f"{codec.density:g} {codec.values}", []).append(m)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads 1, "
        f"torch {torch.__version__}, numpy {np.__version__}; {args.reps} reps, "
        f"{args.steps} local steps of batch {cfg.batch_size} x {cfg.max_seq_len} tokens"
    )
    print(
        "\n| uplink (density, values) | bytes / reply | dense fp32 / bytes | energy kept "
        "| (encode + decode) / training, min | median |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, ms in rows.items():
        codec_frac = [(m["encode_s"] + m["decode_s"]) / m["train_s"] for m in ms]
        print(
            f"| {name} | {ms[0]['bytes']:,} | {ms[0]['dense_fp32'] / ms[0]['bytes']:.1f}x "
            f"| {statistics.median(m['energy_kept'] for m in ms):.3f} "
            f"| {min(codec_frac):.4f} | {statistics.median(codec_frac):.4f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
