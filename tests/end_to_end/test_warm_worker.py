"""The warm worker on loopback: same results as a process per message, one PID, restarts.

Real ``flower-superlink``, SuperNodes (``fedlora-supernode``: Flower's, polling sooner)
with ``--isolation process``, and ``fedlora-worker`` processes, stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil
from safetensors.numpy import load_file

from fedlora.run import results
from fedlora.run.launch import local_federation
from tests.helpers import assert_stopped, tiny_run


def _deploy(tiny_model, tmp_path, name: str, warm: bool, rounds: int = 3, **extra):
    """A 2-node deployment of ``rounds`` rounds; its records, adapter and process PIDs."""
    out = tmp_path / name
    overrides = tiny_run(
        tiny_model,
        out,
        **{"num-server-rounds": rounds, "num-partitions": 2, "seed": 3, **extra},
    )
    with local_federation(tmp_path / f"flwr-{name}") as fed:
        fed.start_superlink(simulation=False)
        for i in range(2):
            node_config = {"partition-id": i, "num-partitions": 2}
            fed.start_supernode(f"node-{i}", node_config, warm=warm)
        status = fed.run_app(overrides, timeout=600)
        pids = [p.pid for proc in fed.processes for p in proc.tree()]
    assert status["status"] == "finished:completed", status
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    return results.read_records(out), adapter, pids


def test_warm_worker_gives_the_per_message_adapter_bit_for_bit_from_one_process(
    tiny_model, tmp_path
):
    """3 rounds with the warm worker and 3 with a ClientApp process per message: the same
    global adapter, bit for bit; each warm node ran every round in one process (and a
    per-message node in a new one each round)."""
    warm, warm_adapter, warm_pids = _deploy(tiny_model, tmp_path, "warm", warm=True)
    cold, cold_adapter, cold_pids = _deploy(tiny_model, tmp_path, "cold", warm=False)
    assert warm_adapter.keys() == cold_adapter.keys()
    for key in warm_adapter:
        assert warm_adapter[key].tobytes() == cold_adapter[key].tobytes(), key
    for w, c in zip(warm, cold, strict=True):  # every round's evaluation, not only the last
        assert w.get("eval_loss") == c.get("eval_loss"), (w["round"], w, c)

    def pids_by_node(records):
        by_node: dict = {}
        for record in records[1:]:
            for node in record["nodes"]:
                by_node.setdefault(node["node_id"], []).append(node["process_id"])
        return by_node

    warm_by_node, cold_by_node = pids_by_node(warm), pids_by_node(cold)
    assert len(warm_by_node) == 2 and all(len(p) == 3 for p in warm_by_node.values())
    assert all(len(set(p)) == 1 for p in warm_by_node.values()), warm_by_node
    assert all(len(set(p)) == 3 for p in cold_by_node.values()), cold_by_node
    # the warm process paid its start once, before the first message: none after it
    assert all(n["process_seconds"] == 0 for r in warm[1:] for n in r["nodes"])
    assert all(n["process_seconds"] > 0 for r in cold[1:] for n in r["nodes"])
    assert_stopped(warm_pids + cold_pids)


def _worker_pid(executor_pid: int, timeout: float = 120.0) -> int:
    """The worker process the executor ``executor_pid`` started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(executor_pid).children():
                if any("warm_worker" in part for part in child.cmdline()):
                    return child.pid
        time.sleep(0.2)
    raise AssertionError(f"executor {executor_pid} started no worker in {timeout:.0f}s")


def test_a_worker_killed_mid_round_loses_that_reply_with_a_reason_and_is_restarted(
    tiny_model, tmp_path
):
    """SIGKILL one node's worker while it trains: the round goes on with the other node
    (the lost reply names the worker and its exit), the run completes, and the next round
    is served by a restarted worker (another PID) of the same executor."""
    out = tmp_path / "killed"
    overrides = tiny_run(
        tiny_model,
        out,
        **{
            "num-server-rounds": 2,
            "num-partitions": 2,
            "min-replies": 1,
            "local-steps": 200,  # long enough to be killed mid-training
        },
    )
    outcome: dict = {}
    with local_federation(tmp_path / "flwr") as fed:
        fed.start_superlink(simulation=False)
        for i in range(2):
            fed.start_supernode(f"node-{i}", {"partition-id": i, "num-partitions": 2})
        executor = fed.workers["node-1"]
        runner = threading.Thread(
            target=lambda: outcome.update(status=fed.run_app(overrides, timeout=600))
        )
        runner.start()
        first_worker = _worker_pid(executor.pid)
        deadline = time.monotonic() + 300
        while "train message" not in executor.log_tail(200) and time.monotonic() < deadline:
            time.sleep(0.1)  # the worker has pulled round 1's training message
        os.kill(first_worker, signal.SIGKILL)
        runner.join(timeout=600)
        second_worker = _worker_pid(executor.pid)
        pids = [p.pid for proc in fed.processes for p in proc.tree()]
    assert outcome.get("status", {}).get("status") == "finished:completed", outcome
    records = results.read_records(out)
    first = records[1]
    lost = [n for n in first["nodes"] if n["status"] != "ok"]
    assert first["num_ok"] == 1 and len(lost) == 1, first["nodes"]
    assert f"PID {first_worker}" in lost[0]["reason"] and "died" in lost[0]["reason"], lost
    assert records[2]["num_ok"] == 2, records[2]["nodes"]
    assert second_worker != first_worker
    restarted = {n["process_id"] for n in records[2]["nodes"]}
    assert second_worker in restarted, (second_worker, restarted)
    assert_stopped([*pids, first_worker, second_worker])


def test_clientapp_module_imports_nothing_heavy():
    """Loading the ClientApp (what every per-message process does first) imports neither
    torch nor transformers, peft or Opacus: the first message that needs them does."""
    import subprocess
    import sys

    heavy = ("torch", "transformers", "peft", "opacus")
    code = (
        f"import sys, fedlora.clients.app; print(','.join(m for m in {heavy} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", done.stdout
