"""SIGTERM, SIGHUP and Ctrl-C stop the whole federation a command started, and quietly.

Real runs: ``fedlora simulate`` / ``fedlora deploy-local`` are started as processes,
signalled once a round is recorded, and every process of their federation (found by
PID and by the launcher's environment marker, wherever it was reparented) must be gone.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from fedlora.run.launch import BIN_DIR
from fedlora.run.processes import MARKER, marked_processes


def _start(command: str, tiny_model: Path, out: Path, *extra: str) -> subprocess.Popen:
    argv = [
        str(BIN_DIR / "fedlora"),
        command,
        "--supernodes",
        "2",
        *("-c", f"model={tiny_model}", "-c", "num-server-rounds=200", "-c", "local-steps=2"),
        *("-c", "clients-per-round=2", "-c", "max-seq-len=16", "-c", "eval-examples=50"),
        *extra,
        "--output-dir",
        str(out),
    ]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _wait_for_round(proc: subprocess.Popen, out: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    rounds = out / "rounds.jsonl"
    while not (rounds.is_file() and len(rounds.read_text().splitlines()) >= 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no round recorded (exit {proc.poll()}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.5)


def _federation(proc: subprocess.Popen) -> tuple[list[psutil.Process], list[str]]:
    """Every process of the run (descendants and marked ones), and their command lines."""
    descendants = psutil.Process(proc.pid).children(recursive=True)
    markers = set()
    for child in descendants:
        try:
            markers.add(child.environ().get(MARKER))
        except psutil.Error:
            continue
    markers.discard(None)
    assert len(markers) == 1, markers
    found = {p.pid: p for p in descendants}
    found.update({p.pid: p for p in marked_processes(markers.pop())})
    lines = []
    for p in found.values():
        try:
            lines.append(" ".join(p.cmdline()) + f" (in {p.cwd()})")
        except psutil.Error:
            continue
    return list(found.values()), lines


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def _signal_and_check(proc: subprocess.Popen, sig: int) -> tuple[str, list[str]]:
    procs, lines = _federation(proc)
    proc.send_signal(sig)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the command did not stop within 120 s of the signal")
    assert proc.returncode == 128 + sig, output[-2000:]
    time.sleep(0.5)
    left = _alive(procs)
    assert not left, [" ".join(p.cmdline()) for p in left]
    assert "Traceback" not in output.split("stopped by")[-1]
    assert f"stopped by {signal.Signals(sig).name}" in output
    return output, lines


def test_sigterm_to_simulate_stops_every_process_and_removes_its_folder(tiny_model, tmp_path):
    out = tmp_path / "run"
    proc = _start("simulate", tiny_model, out)
    _wait_for_round(proc, out)
    _output, lines = _signal_and_check(proc, signal.SIGTERM)
    started = " ".join(lines)
    for name in ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet"):
        assert name in started, f"{name} was not among the run's processes: {lines}"
    workdirs = {line.rsplit("(in ", 1)[1][:-1] for line in lines if "flower-superlink" in line}
    assert workdirs and all("fedlora-flwr-" in w for w in workdirs), lines
    for folder in workdirs:  # the private FLWR_HOME and the logs are gone with the run
        assert not Path(folder).exists(), folder


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_other_signals_to_simulate_stop_it_too(tiny_model, tmp_path, sig):
    out = tmp_path / "run"
    proc = _start("simulate", tiny_model, out)
    _wait_for_round(proc, out)
    _signal_and_check(proc, sig)


@pytest.mark.slow  # the default suite signals a simulate run
def test_sigterm_to_deploy_local_removes_its_throwaway_certificates(tiny_model, tmp_path):
    out = tmp_path / "deploy"
    proc = _start("deploy-local", tiny_model, out)
    _wait_for_round(proc, out)
    _procs, lines = _federation(proc)
    certs = {Path(arg).parent for line in lines for arg in line.split() if arg.endswith("ca.crt")}
    assert certs, lines
    for folder in certs:
        assert not (folder / "ca.key").exists()  # the CA's key is never written
    _signal_and_check(proc, signal.SIGTERM)
    for folder in certs:
        assert not folder.exists(), f"{folder} (the run's certificates) was left behind"
