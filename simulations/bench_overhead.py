"""Benchmark: framework overhead per round of a loopback deployment, and where it goes.

    .venv/bin/python simulations/bench_overhead.py [--supernodes 4] [--rounds 4] [-c key=value ...]

Runs ``fedlora deploy-local`` (a real SuperLink and SuperNodes over gRPC on loopback,
TLS and node authentication on) on the default scenario with every node sampled every
round, then reads the per-round records. Overhead is the training phase's wall time
(configure to the last reply) minus the slowest client's training steps, as a fraction
of that wall time. Every round after the first (which also discovers the nodes and
fills their data caches) is one repetition; min and median are over those rounds.

Where it goes, as fractions of the same wall time, on the node that took longest:
process start (the age of the per-message ClientApp process when the message
arrived: interpreter, imports), setup (data, model load, merging the received adapter),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--supernodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="rounds 2.. are the repetitions")
    parser.add_argument("--insecure", action="store_true", help="no TLS / node auth")
    parser.add_argument(
        "-c", "--config", action="extend", nargs="+", default=[], help="run-config overrides"
    )
    parser.add_argument("--keep", help="keep the run's output folder here")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is warm-up)")

    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedlora-overhead-"))
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
    log = out.parent / f"{out.name}.log"
    # a data cache of its own: cold in round 1, as a new deployment's would be
    env = dict(os.environ, FEDLORA_CACHE_DIR=tempfile.mkdtemp(prefix="fedlora-cache-"))
    with log.open("w") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True, env=env)
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    # round 1 also discovers the nodes and fills their data caches: steady state from 2
    rows = [round_breakdown(r) for r in records if r["round"] > 1]

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )
    print(
        f"fedlora deploy-local, {args.supernodes} SuperNodes on loopback "
        f"({'insecure' if args.insecure else 'TLS + node authentication'}), default scenario "
        f"{' '.join(args.config)}; {len(rows)} rounds, each a repetition\n"
    )
    print("| share of the training phase (configure to last reply) | min | median | goal |")
    print("|---|---:|---:|---:|")
    for key in rows[0]:
        if key == "wall":
            continue
        values = [r[key] for r in rows]
        goal = "< 0.10" if key == "overhead" else "-"
        print(f"| {key} | {min(values):.3f} | {statistics.median(values):.3f} | {goal} |")
    print(
        f"\n(training phase median {statistics.median(r['wall'] for r in rows):.1f} s; log {log})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
