"""Deployment faults on loopback: real SuperLink and SuperNode processes, stopped by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil

from fedlora import results
from fedlora.launch import local_federation
from tests.test_end_to_end import _assert_stopped, _tiny_run


def _wait_for_clientapp(pid: int, timeout: float = 120.0) -> None:
    """Block until the SuperNode ``pid`` runs a ClientApp (a round is under way there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                if any("clientapp" in part for part in child.cmdline()):
                    return
        time.sleep(0.2)
    raise AssertionError(f"SuperNode {pid} started no ClientApp in {timeout:.0f}s")


def test_supernode_killed_mid_round_run_completes_with_the_others(tiny_model, tmp_path):
    """SIGKILL one of three SuperNodes while it trains: both rounds complete with the others,
    and the records say who replied and who did not."""
    out = tmp_path / "killed"
    overrides = _tiny_run(
        tiny_model,
        out,
        **{
            "num-server-rounds": 2,
            "num-partitions": 3,
            "clients-per-round": 3,
            "min-replies": 2,
            "round-timeout": 30.0,
        },
    )
    outcome: dict = {}
    with local_federation(tmp_path / "flwr") as fed:
        fed.start_superlink(simulation=False)
        nodes = [
            fed.start_supernode(f"supernode-{i}", {"partition-id": i, "num-partitions": 3})
            for i in range(3)
        ]
        runner = threading.Thread(
            target=lambda: outcome.update(status=fed.run_app(overrides, timeout=600))
        )
        runner.start()
        victim = nodes[2]
        _wait_for_clientapp(victim.pid)
        os.killpg(victim.pid, signal.SIGKILL)  # the node and the ClientApp it started
        runner.join(timeout=600)
        pids = [p.pid for p in fed.processes]
    assert outcome.get("status", {}).get("status") == "finished:completed", outcome
    records = results.read_records(out)
    assert [r["round"] for r in records] == [0, 1, 2]
    first = records[1]
    assert not first["skipped"] and first["num_ok"] == 2
    statuses = sorted(n["status"] for n in first["nodes"])
    assert statuses.count("ok") == 2 and len(statuses) == 3
    lost = next(n for n in first["nodes"] if n["status"] != "ok")
    assert lost["status"] in ("missing", "error") and lost["reason"]
    assert not records[2]["skipped"] and records[2]["num_ok"] >= 2
    _assert_stopped(pids)
