"""Benchmark: what SecAgg+ costs, in bytes per node and in time, against a plain round.

    .venv/bin/python simulations/bench_secagg.py protocol [--nodes 4 10 50]
    .venv/bin/python simulations/bench_secagg.py system [--nodes 4 10] [--rounds 2] [--loopback]

``protocol``: the four stages in one process for N nodes whose reply is the default
scenario's adapter (its size is computed from the default config), with the real
cryptography. Per node: bytes up and down per stage and the node's compute; for the
server: routing and unmasking; with no dropout and with one node lost after sharing keys
(its pairwise masks are rebuilt). Against plain FedAvg: bytes (one dense float32 reply)
and the server's weighted sum.

``system``: the default scenario with every node sampled, secure-aggregation off and
secagg+ side by side in the same invocation, in-process simulation (and with
``--loopback`` a ``deploy-local`` deployment over TLS); the round's wall time and bytes
per node from the records, rounds after the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedlora.secagg.protocol import (
    NodeSecAgg,
    SecAggParams,
    flatten,
    masked_sum,
    neighbourhoods,
    unmask,
)


def default_reply_size() -> int:
    """Values in one reply of the default scenario (its LoRA factors and head)."""
    from fedlora.config import RunConfig
    from fedlora.data.tables import load_table
    from fedlora.model.models import build_lora_model, lora_spec
    from fedlora.model.peft_state import state_from_peft

    cfg = RunConfig()
    model = build_lora_model(cfg.model, load_table(cfg.data).num_labels, lora_spec(cfg), seed=0)
    state = state_from_peft(model, lora_spec(cfg).scaling).to_state_dict()
    return sum(int(v.size) for v in state.values())


def protocol_round(num: int, size: int, shares: int, drop: bool) -> dict[str, float]:
    """One secure round of ``num`` in-process nodes; bytes and seconds per stage."""
    params = SecAggParams(num_shares=shares, threshold=shares // 2 + 1)
    params.check(num)
    rng = np.random.default_rng(0)
    nodes = list(range(1, num + 1))
    hoods = neighbourhoods(nodes, shares, seed=0)
    out: dict[str, float] = {}
    node_seconds = 0.0
    t = time.perf_counter()
    states, keys = {}, {}
    for n in nodes:
        states[n], pk1, pk2 = NodeSecAgg.setup(n, 1, params)
        keys[n] = (pk1, pk2)
    node_seconds += time.perf_counter() - t
    out["up setup"] = sum(len(a) + len(b) for a, b in keys.values()) / num
    out["down share-keys"] = (
        sum(len(keys[j][0]) + len(keys[j][1]) for n in nodes for j in hoods[n]) / num
    )
    inbox: dict[int, dict[int, bytes]] = {n: {} for n in nodes}
    up = 0
    t = time.perf_counter()
    for n in nodes:
        for dst, c in states[n].share_keys(1, {j: keys[j] for j in hoods[n]}).items():
            inbox[dst][n] = c
            up += len(c)
    node_seconds += time.perf_counter() - t
    out["up share-keys"] = up / num
    out["down collect-masked"] = up / num
    lost = nodes[-1] if drop else None
    vectors = {}
    t = time.perf_counter()
    for n in nodes:
        if n == lost:
            continue
        x = {"update": rng.normal(0, 0.05, size - 1).astype(np.float32)}
        vectors[n], _ = states[n].mask(1, inbox[n], flatten(x, 1.0 / num))
    node_seconds += time.perf_counter() - t
    out["up collect-masked"] = 4.0 * size
    survivors = sorted(vectors)
    dropped = [lost] if lost else []
    shares_by_owner: dict[int, list[bytes]] = {n: [] for n in nodes}
    up = 0
    t = time.perf_counter()
    for n in survivors:
        revealed = states[n].reveal(
            1, [j for j in hoods[n] if j in survivors], [j for j in hoods[n] if j in dropped]
        )
        for owner, s in revealed.items():
            shares_by_owner[owner].append(s)
            up += len(s)
    node_seconds += time.perf_counter() - t
    out["up unmask"] = up / len(survivors)
    t = time.perf_counter()
    total = masked_sum([vectors[n] for n in survivors], params.modulus)
    unmask(
        total,
        params,
        survivors=survivors,
        dropped=dropped,
        shares=shares_by_owner,
        neighbours=hoods,
        public_keys=keys,
    )
    out["server seconds"] = time.perf_counter() - t
    out["node seconds"] = node_seconds / num
    t = time.perf_counter()
    plain = [rng.normal(0, 0.05, size).astype(np.float32) for _ in survivors]
    t = time.perf_counter()
    acc = np.zeros(size, np.float64)
    for v in plain:
        acc += v * np.float32(1.0 / num)
    out["plain server seconds"] = time.perf_counter() - t
    return out


def run_protocol(args: argparse.Namespace) -> None:
    size = args.values or default_reply_size()
    print(f"reply of the default scenario: {size:,} values ({4 * size / 2**20:.2f} MiB float32)")
    print(
        "| nodes | shares | dropout | node up B (all stages) | / plain | node down B (protocol) "
        "| node s | server s | plain server s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for num in args.nodes:
        for shares in sorted({num, min(num, args.ring)} if num > args.ring else {num}):
            for drop in (False, True):
                r = protocol_round(num, size, shares, drop)
                up = sum(v for k, v in r.items() if k.startswith("up "))
                down = sum(v for k, v in r.items() if k.startswith("down "))
                print(
                    f"| {num} | {shares} | {'1 after keys' if drop else 'none'} | {up:,.0f} | "
                    f"{up / (4 * size):.4f} | {down:,.0f} | {r['node seconds']:.3f} | "
                    f"{r['server seconds']:.3f} | {r['plain server seconds']:.4f} |"
                )
                sys.stdout.flush()


def _simulate(mode: str, nodes: int, rounds: int, out: Path, loopback: bool) -> list[dict]:
    """One run of the default scenario, every node sampled; its round records."""
    settings = {
        "num-server-rounds": rounds,
        "num-partitions": nodes,
        "clients-per-round": nodes,
        "min-replies": nodes,
        "secure-aggregation": mode,
    }
    fedlora = Path(sys.executable).with_name("fedlora")
    command = [str(fedlora), "deploy-local" if loopback else "simulate", "--supernodes", str(nodes)]
    command += ["--output-dir", str(out)]
    command += [x for k, v in settings.items() for x in ("-c", f"{k}={v}")]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def run_system(args: argparse.Namespace) -> None:
    print(
        "| where | nodes | train phase s, off | secagg+ | ratio | bytes up / node, off | secagg+ |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for where in ["simulation", *(["loopback"] if args.loopback else [])]:
            for nodes in args.nodes:
                row = {}
                for mode in ("off", "secagg+"):
                    out = Path(tmp) / f"{where}-{nodes}-{mode.strip('+')}"
                    records = _simulate(mode, nodes, args.rounds, out, where == "loopback")[2:]
                    wall = statistics.median(
                        r["phase_seconds"]["configure"] + r["phase_seconds"]["train"]
                        for r in records
                    )
                    secagg_bytes = statistics.median(
                        sum(v for k, v in r["metrics"].items() if k.startswith("secagg-bytes-up"))
                        for r in records
                    )
                    up = statistics.median(r["bytes_up"] for r in records) / nodes
                    row[mode] = (wall, up if mode == "off" else secagg_bytes / nodes)
                (w0, b0), (w1, b1) = row["off"], row["secagg+"]
                print(
                    f"| {where} | {nodes} | {w0:.1f} | {w1:.1f} | {w1 / w0:.3f} | {b0:,.0f} "
                    f"| {b1:,.0f} |"
                )
                sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("protocol")
    p.add_argument("--nodes", type=int, nargs="+", default=[4, 10, 50])
    p.add_argument("--ring", type=int, default=7, help="SecAgg+ neighbourhood for larger N")
    p.add_argument("--values", type=int, default=0, help="reply size (0: the default scenario)")
    s = sub.add_parser("system")
    s.add_argument("--nodes", type=int, nargs="+", default=[4, 10])
    s.add_argument("--rounds", type=int, default=2)
    s.add_argument("--loopback", action="store_true")
    args = parser.parse_args()
    run_protocol(args) if args.part == "protocol" else run_system(args)


if __name__ == "__main__":
    main()
