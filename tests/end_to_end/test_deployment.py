"""Deployment on loopback: TLS, node authentication, faults; real processes stopped by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from safetensors.numpy import load_file

from fedlora.run import results
from fedlora.run.certs import make_node_key, make_server_files
from fedlora.run.launch import BIN_DIR, LaunchError, free_port, local_federation, wait_for_port
from tests.helpers import assert_stopped, tiny_run


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


@pytest.mark.slow  # per-message mode; the default suite kills a warm worker instead
def test_supernode_killed_mid_round_run_completes_with_the_others(tiny_model, tmp_path):
    """SIGKILL one of three SuperNodes while it trains: both rounds complete with the others,
    and the records say who replied and who did not."""
    out = tmp_path / "killed"
    overrides = tiny_run(
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
            # a ClientApp process per message (the warm worker's own test kills its worker)
            fed.start_supernode(
                f"supernode-{i}", {"partition-id": i, "num-partitions": 3}, warm=False
            )
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
    # the round after the kill did not wait round-timeout for the dead node to come back
    waited = records[2]["phase_seconds"]["discover"] + records[2]["phase_seconds"]["configure"]
    assert waited < 15.0, records[2]["phase_seconds"]
    assert_stopped(pids)


def test_server_certificate_names_every_address(tmp_path):
    files = make_server_files(tmp_path, ["127.0.0.1", "superlink.example.org"])
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert oct(files.key.stat().st_mode & 0o777) == "0o600"
    key = make_node_key(tmp_path, "site-a")
    assert key.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert b"OPENSSH PRIVATE KEY" in key.private.read_bytes()


def test_tls_with_node_auth_admits_only_registered_nodes_that_trust_the_ca(tiny_model, tmp_path):
    """TLS and SuperNode authentication on: a registered node completes a round; a node
    whose key is not registered, and one without the CA, are refused and exit."""
    files = make_server_files(tmp_path / "certs", ["127.0.0.1", "localhost"])
    registered, stranger = (make_node_key(tmp_path / "certs", n) for n in ("site-a", "site-b"))
    tls = files.as_tls()
    out = tmp_path / "tls"
    overrides = tiny_run(
        tiny_model,
        out,
        **{"num-server-rounds": 1, "num-partitions": 2, "clients-per-round": 1, "min-replies": 1},
    )
    with local_federation(tmp_path / "flwr") as fed:
        fed.start_superlink(simulation=False, tls=tls, node_auth=True)
        fed.register_node(registered.public)
        node_config = {"partition-id": 0, "num-partitions": 2}
        fed.start_supernode("site-a", node_config, tls=tls, auth_key=registered.private)
        refused = [
            fed.start_supernode("site-b", node_config, tls=tls, auth_key=stranger.private),
            fed.start_supernode("no-ca", node_config, tls={}, auth_key=registered.private),
        ]
        status = fed.run_app(overrides, timeout=600)  # the CLI reaches the SuperLink over TLS
        for proc in refused:
            assert proc.popen.wait(timeout=120) != 0, proc.log_tail()
        online = [n for n in fed.node_list() if n["status"] == "online"]
        pids = [p.pid for p in fed.processes]
    assert status["status"] == "finished:completed"
    records = results.read_records(out)
    assert records[1]["num_ok"] == 1 and len(online) == 1
    assert "Failed to activate SuperNode" in refused[0].log_path.read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in refused[1].log_path.read_text()
    assert_stopped(pids)


def _serverapp_pids(superlink_pid: int) -> list[int]:
    with contextlib.suppress(psutil.Error):
        return [
            p.pid
            for p in psutil.Process(superlink_pid).children(recursive=True)
            if any("serverapp" in part for part in p.cmdline())
        ]
    return []


@pytest.mark.slow
def test_serverapp_killed_after_round_2_resumes_to_the_same_adapter(tiny_model, tmp_path):
    """SIGKILL the ServerApp once round 2 is checkpointed, resume: the final adapter equals
    an uninterrupted run's, and rounds 0..4 are each recorded once."""
    config = {"num-server-rounds": 4, "num-partitions": 2, "clients-per-round": 2}
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    with local_federation(tmp_path / "flwr") as fed:
        superlink = fed.start_superlink(simulation=False)
        for i in range(2):
            node_config = {
                "partition-id": i,
                "num-partitions": 2,
                "state-dir": str(tmp_path / f"n{i}"),
            }
            fed.start_supernode(f"supernode-{i}", node_config)
        failure: dict = {}

        def first_attempt() -> None:
            try:
                fed.run_app(tiny_run(tiny_model, killed, **config), timeout=600)
            except LaunchError as err:
                failure["error"] = str(err)

        runner = threading.Thread(target=first_attempt)
        runner.start()
        deadline = time.monotonic() + 600
        while not (killed / "checkpoints" / "round-0002").is_dir():
            assert time.monotonic() < deadline and runner.is_alive(), "round 2 never finished"
            time.sleep(0.2)
        victims = _serverapp_pids(superlink.pid)
        assert victims, "no ServerApp process found"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        runner.join(timeout=600)
        assert "failed" in failure.get("error", ""), failure
        fed.run_app(tiny_run(tiny_model, killed, **config, resume="latest"), timeout=600)
        fed.run_app(tiny_run(tiny_model, whole, **config), timeout=600)
        pids = [p.pid for p in fed.processes]
    a = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert abs(a[key] - b[key]).max() <= 1e-5, key
    assert [r["round"] for r in results.read_records(killed)] == [0, 1, 2, 3, 4]
    assert_stopped(pids)


@pytest.mark.slow
def test_simulation_runs_on_an_existing_ray_cluster(tiny_model, tmp_path):
    """A local `ray start --head` stands in for a cluster; the SuperLink joins it via
    RAY_ADDRESS, and the cluster's processes are stopped by PID with the rest."""
    out = tmp_path / "ray"
    port = free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="fedlora-ray-", dir="/tmp"))  # short: socket paths
    with local_federation(tmp_path / "flwr") as fed:
        fed.env |= {"RAY_USAGE_STATS_ENABLED": "0"}
        head = fed.start(
            "ray-head",
            [
                str(BIN_DIR / "ray"),
                "start",
                "--head",
                "--block",
                "--port",
                str(port),
                "--num-cpus",
                "2",
                "--include-dashboard",
                "false",
                "--temp-dir",
                str(ray_tmp),
            ],
        )
        wait_for_port(f"127.0.0.1:{port}", head, timeout=120)
        fed.env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        fed.start_superlink(simulation=True)
        # no init-args: a driver that joins a cluster must not size it
        status = fed.run_app(
            tiny_run(tiny_model, out, **{"num-server-rounds": 1}),
            {"num-supernodes": 3, "client-resources-num-cpus": 1},
            timeout=600,
        )
        pids = [p.pid for p in fed.processes]
        # the ClientApp actors ran in the cluster: its session holds their worker logs
        files = [p for p in ray_tmp.rglob("*") if p.is_file()]
        workers = [p.name for p in files if p.name.startswith("python-core-worker-")]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert status["status"] == "finished:completed"
    assert results.read_records(out)[1]["num_ok"] == 2
    assert workers, f"no worker ran in the cluster ({len(files)} files in {ray_tmp})"
    assert_stopped(pids)
