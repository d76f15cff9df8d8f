"""Benchmark: server aggregation against a numpy weighted-sum floor, time and peak memory.

    .venv/bin/python simulations/bench_aggregation.py [--clients 100] [--layers 32] [--reps 3]

The default shape is a 7B Llama's q_proj and v_proj at r=16: 32 layers x 2 modules x
(16 x 4096 + 4096 x 16) = 8.4M LoRA parameters per client, 100 clients (3.4 GB of
client factors in float32). Every strategy's ``aggregate`` runs on the same decoded
updates as the floor, ``out += w_k * x_k`` over the same arrays in float32 (fedlora
accumulates in float64), alternating across repetitions after one warm-up call each.
The per-round aggregation-error measurement of the base class (exact, from Gram
matrices) is timed on its own. Peak memory is what numpy allocates during the
call (tracemalloc, in a separate untimed call), as a multiple of one client's update.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence

import numpy as np

from fedlora.lora.spec import LoraSpec
from fedlora.run.registry import load_strategy_class
from fedlora.strategies.api import (
    AdapterState,
    ClientPlan,
    ClientUpdate,
    LoraFactors,
    aggregation_error,
)


def make_updates(
    clients: int, layers: int, rank: int, dim: int, scaling: float, seed: int
) -> list[ClientUpdate]:
    """Random client adapters over q_proj and v_proj of ``layers`` decoder layers."""
    rng = np.random.default_rng(seed)
    modules = [
        f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "v_proj")
    ]
    updates = []
    for k in range(clients):
        factors = {
            m: LoraFactors(
                a=rng.standard_normal((rank, dim), dtype=np.float32),
                b=rng.standard_normal((dim, rank), dtype=np.float32),
            )
            for m in modules
        }
        updates.append(
            ClientUpdate(
                node_id=k + 1,
                num_examples=int(rng.integers(50, 500)),
                state=AdapterState(factors, {}, scaling),
                metrics={},
                plan=ClientPlan(rank=rank),
            )
        )
    return updates


def numpy_floor(
    flats: Sequence[dict[str, np.ndarray]], weights: np.ndarray
) -> dict[str, np.ndarray]:
    """The least a weighted average can do: one multiply-add per client per tensor."""
    out: dict[str, np.ndarray] = {}
    for key in flats[0]:
        acc = np.zeros_like(flats[0][key])
        for flat, w in zip(flats, weights, strict=True):
            acc += np.float32(w) * flat[key]
        out[key] = acc
    return out


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes numpy allocated during one call.

    A separate, untimed call: tracemalloc slows allocation-heavy code more than the floor.
    """
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--strategies", nargs="+", default=["fedavg", "ffa_lora", "lora_fair", "flora"]
    )
    parser.add_argument(
        "--no-error", action="store_true", help="skip timing the aggregation-error measurement"
    )
    args = parser.parse_args(argv)

    spec = LoraSpec(args.rank, 2.0 * args.rank, ("q_proj", "v_proj"))
    updates = make_updates(args.clients, args.layers, args.rank, args.dim, spec.scaling, 0)
    weights = np.array([u.num_examples for u in updates], dtype=np.float64)
    weights /= weights.sum()
    current = AdapterState(
        {m: LoraFactors(f.a, f.b) for m, f in updates[0].state.factors.items()}, {}, spec.scaling
    )
    per_client = sum(v.nbytes for v in updates[0].state.to_state_dict().values())
    strategies = {}
    for name in args.strategies:
        strategy = load_strategy_class(name)(spec)
        strategy.initial_state(current)
        strategies[name] = strategy

    def run_strategy(name: str) -> Callable[[], object]:
        return lambda: strategies[name].aggregate(1, updates, weights, current)

    flats = [u.state.to_state_dict() for u in updates]
    cases: dict[str, Callable[[], object]] = {"numpy floor": lambda: numpy_floor(flats, weights)}
    cases.update({f"{name}.aggregate": run_strategy(name) for name in args.strategies})
    if not args.no_error:
        result = strategies[args.strategies[0]].aggregate(1, updates, weights, current)
        cases["aggregation error (exact)"] = lambda: aggregation_error(updates, weights, result)

    for fn in cases.values():  # warm-up: first-touch page faults, BLAS threads
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.reps):
        for key, fn in cases.items():
            times[key].append(seconds(fn))
    peaks = {key: peak_bytes(fn) for key, fn in cases.items()}

    floor = times["numpy floor"]
    params = per_client // 4
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, numpy {np.__version__}"
    )
    print(
        f"{args.clients} clients x {params / 1e6:.1f}M LoRA parameters "
        f"({args.layers} layers x q,v at r={args.rank}, d={args.dim}); "
        f"{args.reps} repetitions, ratios taken per repetition\n"
    )
    print("| measure | time / floor (min) | (median) | peak memory / one update | goal |")
    print("|---|---:|---:|---:|---:|")
    for key in cases:
        ratios = [t / f for t, f in zip(times[key], floor, strict=True)]
        goal = "<= 1.5" if key == "fedavg.aggregate" else "-"
        print(
            f"| {key} | {min(ratios):.2f} | {statistics.median(ratios):.2f} "
            f"| {peaks[key] / per_client:.1f} | {goal} |"
        )
    print(f"\n(floor median {statistics.median(floor):.2f} s on this machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
