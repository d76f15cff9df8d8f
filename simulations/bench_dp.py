"""Benchmark: DP-SGD step time and peak memory against plain training, on MiniLM.

    .venv/bin/python simulations/bench_dp.py [--steps 10] [--reps 3]

Both modes run the same model (embedded MiniLM + LoRA r=8 on query,value + head), the
same batch size and sequence length, in fresh subprocesses (so peak resident memory is
per mode), alternating modes across repetitions. Prints a table of ratios with min and
median over repetitions, and the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time


def _one(mode: str, steps: int, batch: int, seq: int) -> dict:
    import resource

    import torch

    from fedlora.lora.spec import LoraSpec
    from fedlora.model.models import build_lora_model
    from fedlora.model.train import make_optimizer
    from fedlora.privacy.dp_sgd import make_private, new_budget

    torch.manual_seed(0)
    model = build_lora_model("embedded", 20, LoraSpec(8, 16.0, ("query", "value")), seed=0)
    n = batch * 64
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randint(1000, 20000, (n, seq), generator=g),
        torch.ones(n, seq, dtype=torch.long),
        torch.randint(0, 20, (n,), generator=g),
    )
    optimizer = make_optimizer(model, 1e-3)
    if mode == "dp":
        budget = new_budget(
            accountant="rdp",
            target_epsilon=1e9,
            delta=1e-5,
            num_examples=n,
            batch_size=batch,
            steps_per_round=steps + 2,
            expected_rounds=1,
            noise_multiplier=1.0,
        )
        run = make_private(
            model, optimizer, data, budget=budget, clip_norm=1.0, steps=steps + 2, seed=0
        )
        model, optimizer, loader = run.model, run.optimizer, list(run.loader)
    else:
        loader = list(
            torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, generator=g)
        )[: steps + 2]
    model.train()
    times = []
    for i, b in enumerate(loader):
        if b is None:
            continue
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=b[0], attention_mask=b[1], labels=b[2]).loss
        loss.backward()
        optimizer.step()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(times), "peak_rss_mib": rss_mib}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--worker", choices=["plain", "dp"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_one(args.worker, args.steps, args.batch, args.seq)))
        return 0
    rows: dict[str, list[dict]] = {"plain": [], "dp": []}
    for _ in range(args.reps):
        for mode in ("plain", "dp"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    mode,
                    "--steps",
                    str(args.steps),
                    "--batch",
                    str(args.batch),
                    "--seq",
                    str(args.seq),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratios = [d["step_s"] / p["step_s"] for p, d in zip(rows["plain"], rows["dp"], strict=True)]
    mem = [
        d["peak_rss_mib"] / p["peak_rss_mib"]
        for p, d in zip(rows["plain"], rows["dp"], strict=True)
    ]
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} cores, python {platform.python_version()}"
    )
    print(
        f"MiniLM + LoRA r=8 (query,value) + head, batch {args.batch} x {args.seq} tokens, "
        f"{args.steps} timed steps, {args.reps} repetitions\n"
    )
    print("| measure | min | median | goal |")
    print("|---|---:|---:|---:|")
    print(
        f"| DP-SGD step / plain step | {min(ratios):.2f} | {statistics.median(ratios):.2f} "
        f"| <= 1.5 |"
    )
    print(f"| DP peak RSS / plain peak RSS | {min(mem):.2f} | {statistics.median(mem):.2f} | - |")
    plain = statistics.median(r["step_s"] for r in rows["plain"])
    print(f"\n(plain step median {plain * 1000:.0f} ms on this machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
