"""Benchmark: framework overhead per round of a loopback deployment, and where it goes.

    .venv/bin/python simulations/bench_overhead.py [--supernodes 4] [--rounds 4] [-c key=value ...]

Runs ``fedlora deploy-local`` once per mode, side by side: with the warm worker (one
long-lived process per SuperNode, the default), with ``--per-message`` (Flower's fresh
ClientApp process for every message) and, with ``--modes warm,warm-flower-polls``, warm
but with Flower's own 3 s polls (the ServerApp's for replies, an idle SuperNode's for
messages) instead of fedlora's 0.2 s and 0.5 s (fedlora/config/polling.py). Each run
is a real SuperLink and SuperNodes over gRPC on loopback (TLS and node authentication
on), the default scenario, every node sampled every round; the benchmark reads the
per-round records. Overhead is the training phase's wall time (configure to the last
reply) minus the slowest client's training steps, as a fraction of that wall time.
Every round after the first (which also discovers the nodes and
fills their data caches) is one repetition; min and median are over those rounds.

Where it goes, as fractions of the same wall time, on the node that took longest:
process start (the age of the ClientApp process when its first message's imports
were done: interpreter, Flower, torch, transformers, peft; 0 for a warm worker's later
messages), setup (data, model load, merging the received adapter),
encoding the reply, and the rest (serialisation, gRPC transport, SuperLink queueing,
server configure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fedlora.config.polling import IDLE_PULL_ENV, REPLY_POLL_ENV

MODES = ("warm", "per-message", "warm-flower-polls")


def round_breakdown(record: dict) -> dict[str, float]:
    """Overhead fractions of one round record (``phase_seconds`` and per-node timings)."""
    phases = record["phase_seconds"]
    wall = float(phases["configure"]) + float(phases["train"])
    nodes = [n for n in record["nodes"] if n["status"] == "ok" and n.get("train_seconds")]
    if not nodes:
        raise ValueError(f"round {record['round']}: no node reported its timings")
    slowest_train = max(float(n["train_seconds"]) for n in nodes)
    critical = max(nodes, key=lambda n: float(n["process_seconds"]) + float(n["handler_seconds"]))
    process = float(critical["process_seconds"])
    handler = float(critical["handler_seconds"])
    encode = float(critical.get("encode_seconds") or 0.0)
    setup = handler - float(critical["train_seconds"]) - encode
    return {
        "overhead": (wall - slowest_train) / wall,
        "process start": process / wall,
        "setup (data, model, merge)": setup / wall,
        "encode reply": encode / wall,
        "transport, serialisation, server": max(wall - process - handler, 0.0) / wall,
        "round incl. server eval / train phase": float(record["seconds"]) / wall,
        "wall": wall,
    }


def run_mode(args: argparse.Namespace, mode: str) -> tuple[list[dict], list[dict], Path]:
    """One ``deploy-local`` run in ``mode``: all records, the training rounds, its log."""
    out = (
        Path(args.keep) / mode if args.keep else Path(tempfile.mkdtemp(prefix="fedlora-overhead-"))
    )
    fedlora = Path(sys.executable).with_name("fedlora")
    overrides = [
        f"num-server-rounds={args.rounds}",
        f"clients-per-round={args.supernodes}",
        f"min-replies={args.supernodes}",
        *args.config,
    ]
    cmd = [str(fedlora), "deploy-local", "--supernodes", str(args.supernodes)]
    cmd += ["--output-dir", str(out)]
    cmd += [arg for pair in overrides for arg in ("-c", pair)]
    if args.insecure:
        cmd.append("--insecure")
    if mode == "per-message":
        cmd.append("--per-message")
    log = out.parent / f"{out.name}.log"
    # a data cache of its own: cold in round 1, as a new deployment's would be
    env = dict(os.environ, FEDLORA_CACHE_DIR=tempfile.mkdtemp(prefix="fedlora-cache-"))
    for name in (REPLY_POLL_ENV, IDLE_PULL_ENV):  # fedlora's defaults, or Flower's 3 s
        env.pop(name, None)
        if mode == "warm-flower-polls":
            env[name] = "3"
    with log.open("w") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True, env=env)
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return records, [r for r in records if r["round"] >= 1], log


def peak_rss(trained: list[dict]) -> dict[str, float]:
    """Peak resident memory of a node's ClientApp process (MiB): the largest node, in round
    2 and in the last round (a warm worker that leaked would grow between them)."""

    def largest(record: dict) -> float:
        return max(float(n.get("process_peak_mib") or 0.0) for n in record["nodes"])

    return {"round 2": largest(trained[1]), "last round": largest(trained[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--supernodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="rounds 2.. are the repetitions")
    parser.add_argument("--insecure", action="store_true", help="no TLS / node auth")
    parser.add_argument(
        "--modes",
        default="warm,per-message",
        help="comma-separated: warm (fedlora-worker), per-message (Flower's process per "
        "message), warm-flower-polls (warm, with Flower's 3 s reply and idle-node polls)",
    )
    parser.add_argument(
        "-c", "--config", action="extend", nargs="+", default=[], help="run-config overrides"
    )
    parser.add_argument("--keep", help="keep the runs' output folders under this folder")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (round 1 is warm-up; memory compares 2 and last)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown --modes {unknown}: choose from {', '.join(MODES)}")
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)

    rows: dict[str, list[dict[str, float]]] = {}
    memory: dict[str, dict[str, float]] = {}
    logs = []
    for mode in modes:
        _records, trained, log = run_mode(args, mode)
        # round 1 also discovers the nodes and fills their data caches: steady state from 2
        rows[mode] = [round_breakdown(r) for r in trained[1:]]
        memory[mode] = peak_rss(trained)
        logs.append(str(log))

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )
    print(
        f"fedlora deploy-local, {args.supernodes} SuperNodes on loopback "
        f"({'insecure' if args.insecure else 'TLS + node authentication'}), default scenario "
        f"{' '.join(args.config)}; {args.rounds - 1} rounds per mode, each a repetition\n"
    )
    header = " | ".join(f"{m} min | {m} median" for m in modes)
    print(f"| share of the training phase (configure to last reply) | {header} | goal |")
    print("|---|" + "---:|" * (2 * len(modes)) + "---:|")
    for key in rows[modes[0]][0]:
        if key == "wall":
            continue
        cells = []
        for mode in modes:
            values = [r[key] for r in rows[mode]]
            cells += [f"{min(values):.3f}", f"{statistics.median(values):.3f}"]
        goal = "< 0.10" if key == "overhead" else "-"
        print(f"| {key} | {' | '.join(cells)} | {goal} |")
    walls = ", ".join(f"{m} {statistics.median(r['wall'] for r in rows[m]):.1f} s" for m in modes)
    print(f"\ntraining phase, median: {walls}")
    first = statistics.median(r["wall"] for r in rows[modes[0]])
    for other in modes[1:]:
        b = statistics.median(r["wall"] for r in rows[other])
        print(f"ratio {modes[0]} / {other} training phase: {first / b:.2f}")
    print("\n| peak RSS of a node's ClientApp process (MiB, largest node) | round 2 | last round |")
    print("|---|---:|---:|")
    for mode in modes:
        print(f"| {mode} | {memory[mode]['round 2']:.0f} | {memory[mode]['last round']:.0f} |")
    print(f"\nlogs: {', '.join(logs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
