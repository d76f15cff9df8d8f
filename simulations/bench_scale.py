"""Benchmark: 1000 virtual clients, 10 per round, against 10 virtual clients.

    .venv/bin/python simulations/bench_scale.py [--many 1000] [--few 10] [--rounds 4]

Runs ``fedlora simulate`` (a SuperLink with the simulation runtime, Ray) twice, with
the same per-round work (10 clients sampled, the same steps) and only the number of
virtual clients different. Peak resident memory is the largest sum, sampled every
0.5 s, over every process the run started (SuperLink, ServerApp, Ray and its workers).
Time per round is the training phase of each round after the first (the first pays
for starting the Ray workers); those rounds are the repetitions. Each run starts with
an empty data cache, so with 1000 clients nearly every sampled client prepares its
data in its round (as it would in a real federation of that size), while the 10
clients of the small run have theirs in memory after round 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

DEFAULTS = ("local-steps=5", "partitioner=iid", "eval-examples=200")
"""Short rounds (the per-round framework cost is the point); IID because 1000 Dirichlet
partitions of 20 Newsgroups cannot be drawn (a clear ConfigError says so)."""


class PeakMemory:
    """Peak summed RSS of a process, its descendants and anything it spawned (daemons)."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0
        self.started = time.time() - 1.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _processes(self) -> list[psutil.Process]:
        me = psutil.Process().username()
        found = {}
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.root)
            for p in [root, *root.children(recursive=True)]:
                found[p.pid] = p
        # Ray daemonises its GCS and raylet: catch them by start time and owner
        for p in psutil.process_iter(["create_time", "username", "cmdline"]):
            info = p.info
            cmd = " ".join(info["cmdline"] or [])
            if (
                info["username"] == me
                and (info["create_time"] or 0) >= self.started
                and ("ray" in cmd or "flwr" in cmd or "flower" in cmd)
            ):
                found[p.pid] = p
        return list(found.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in self._processes():
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)


def run(clients: int, rounds: int, per_round: int, extra: list[str], out: Path) -> dict:
    """One simulated run; its peak memory and per-round training-phase seconds."""
    fedlora = Path(sys.executable).with_name("fedlora")
    cmd = [str(fedlora), "simulate", "--supernodes", str(clients), "--output-dir", str(out)]
    overrides = [
        f"num-server-rounds={rounds}",
        f"clients-per-round={per_round}",
        f"min-replies={per_round}",
        *extra,
    ]
    cmd += [arg for pair in overrides for arg in ("-c", pair)]
    log = out.parent / f"{out.name}.log"
    # each run prepares its clients' data from scratch (no cache left by an earlier run)
    env = dict(os.environ, FEDLORA_CACHE_DIR=str(out.parent / f"{out.name}-cache"))
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        with PeakMemory(proc.pid) as memory:
            rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    seconds = [
        r["phase_seconds"]["configure"] + r["phase_seconds"]["train"]
        for r in records
        if r["round"] > 1
    ]
    return {"peak_rss": memory.peak, "round_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--many", type=int, default=1000)
    parser.add_argument("--few", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "-c",
        "--config",
        action="extend",
        nargs="+",
        default=[],
        help="run-config overrides for both runs (after the defaults: " + " ".join(DEFAULTS) + ")",
    )
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first round is warm-up)")

    work = Path(tempfile.mkdtemp(prefix="fedlora-scale-"))
    config = [*DEFAULTS, *args.config]
    runs = {
        n: run(n, args.rounds, args.per_round, config, work / f"clients-{n}")
        for n in (args.few, args.many)
    }
    few, many = runs[args.few], runs[args.many]
    ratios = [m / f for m, f in zip(many["round_seconds"], few["round_seconds"], strict=True)]
    gib = 1024**3
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / gib:.0f} GiB, python {platform.python_version()}"
    )
    print(
        f"fedlora simulate, {args.per_round} clients per round, {args.rounds} rounds, "
        f"{' '.join(config)}; rounds 2..{args.rounds} are the repetitions\n"
    )
    print("| measure | value | goal |")
    print("|---|---:|---:|")
    print(f"| peak RSS, {args.many} virtual clients (GiB) | {many['peak_rss'] / gib:.2f} | < 6 |")
    print(f"| peak RSS, {args.few} virtual clients (GiB) | {few['peak_rss'] / gib:.2f} | - |")
    ratio = many["peak_rss"] / few["peak_rss"]
    print(f"| peak RSS ratio {args.many} / {args.few} | {ratio:.2f} | - |")
    print(
        f"| time per round ratio {args.many} / {args.few} (min, median) "
        f"| {min(ratios):.2f}, {statistics.median(ratios):.2f} | - |"
    )
    print(f"\n(outputs and logs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
