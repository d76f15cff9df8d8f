"""Start Flower processes on this machine and run the app against them.

Used by ``fedlora simulate``, ``fedlora deploy-local`` and the end-to-end tests. It
works around the Flower facts listed in docs/architecture.md: it starts its own SuperLink instead of
``flwr run``'s auto-started one, keeps Flower's CLI state in a private ``FLWR_HOME``,
disables runtime dependency installation, puts the venv's ``bin`` on ``PATH`` (the
SuperLink starts ``flower-superexec`` by bare name), reads the run's final status
(``flwr run`` exits 0 even when a run failed) and stops every process it started by
PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from fedlora.config.polling import check_polling
from fedlora.run.processes import (
    MARKER,
    STOP_GRACE_SECONDS,
    interrupt_on_signals,
    marked_processes,
    stop_processes,
)

APP_DIR = Path(__file__).resolve().parents[2]
"""The Flower app: the repository root, which holds pyproject.toml."""
BIN_DIR = Path(sys.executable).parent


class LaunchError(RuntimeError):
    """A Flower process failed to start, or a run did not complete."""


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_env(
    flwr_home: Path,
    threads: int = 1,
    extra: Mapping[str, str] | None = None,
    offline: bool = True,
) -> dict:
    """Environment for Flower processes and the ``flwr`` CLI (with a fresh :data:`MARKER`).

    ``offline``: the run names no hub model, so the Hugging Face Hub is switched off
    (no network calls, no waiting on timeouts); the user's own ``HF_HUB_OFFLINE`` wins.
    """
    env = dict(os.environ)
    env.update(
        {
            MARKER: uuid.uuid4().hex,
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1" if offline else "0"),
            # a simulated client given no GPU (--gpus-per-client 0) must not see one: Ray then
            # blanks CUDA_VISIBLE_DEVICES for it, so device=auto trains on the CPU
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",
            "PATH": f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    env.update(extra or {})
    return env


@dataclass
class Process:
    """A started Flower process with its log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        """The OS process id."""
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of the process log (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def tree(self) -> list[psutil.Process]:
        """The process and its descendants, by PID (empty once it has exited)."""
        if self.popen.poll() is not None:
            return []
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []


@dataclass
class LocalFederation:
    """Flower processes started on loopback, plus the ``flwr`` CLI wired to them."""

    workdir: Path
    env: dict[str, str]
    processes: list[Process] = field(default_factory=list)
    workers: dict[str, Process] = field(default_factory=dict)
    """The warm executor of each SuperNode started with ``warm=True``, by node name."""
    control_address: str = ""
    fleet_address: str = ""
    connection: str = "fedlora-local"

    def start(self, name: str, argv: Sequence[str], cwd: Path | None = None) -> Process:
        """Start ``argv`` in its own process group, logging to ``workdir/name.log``.

        ``cwd``: its working directory (default: the federation's folder).
        """
        log_path = self.workdir / f"{name}.log"
        handle: IO[bytes] = log_path.open("wb")
        popen = subprocess.Popen(
            list(argv),
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=cwd or self.workdir,
            start_new_session=True,
        )
        handle.close()
        proc = Process(name, popen, log_path)
        self.processes.append(proc)
        return proc

    def start_superlink(
        self,
        simulation: bool,
        tls: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        node_auth: bool = False,
    ) -> Process:
        """Start a SuperLink (simulation runtime, or gRPC-rere Fleet API for deployment).

        ``tls`` (``ca``, ``cert``, ``key`` paths) turns TLS on; ``node_auth`` admits only
        SuperNodes whose public key was registered (:meth:`register_node`).
        """
        control_port = free_port()
        self.control_address = f"127.0.0.1:{control_port}"
        argv = [
            str(BIN_DIR / "flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(control_port),
            "--disable-runtime-dependency-installation",
        ]
        argv += _tls_args(tls)
        if node_auth:
            argv.append("--enable-supernode-auth")
        if simulation:
            argv.append("--simulation")
        else:
            self.fleet_address = f"127.0.0.1:{free_port()}"
            argv += ["--fleet-api-type", "grpc-rere", "--fleet-api-address", self.fleet_address]
        proc = self.start("superlink", [*argv, *extra_args])
        wait_for_port(self.control_address, proc)
        if self.fleet_address:
            wait_for_port(self.fleet_address, proc)
        self._write_connection(tls)
        return proc

    def start_supernode(
        self,
        name: str,
        node_config: Mapping[str, Any],
        tls: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        auth_key: str | Path | None = None,
        cwd: Path | None = None,
        warm: bool = True,
    ) -> Process:
        """Start a SuperNode that connects to this SuperLink's Fleet API over gRPC-rere.

        ``auth_key``: the node's private key (OpenSSH format), for a SuperLink with node
        authentication. ``cwd``: the node's working directory (another machine's, say).
        ``warm``: run its ClientApp in one long-lived worker (``fedlora-worker``, started
        beside it as ``<name>-worker``: :attr:`workers`) rather than a fresh process per
        message. The SuperNode is ``fedlora-supernode``: ``flower-supernode`` with its 3 s
        idle pull capped (``FEDLORA_SUPERNODE_IDLE_PULL=3`` in the environment restores
        Flower's rate).
        """
        if not self.fleet_address:
            raise LaunchError("start_superlink(simulation=False) must come first")
        runtime_address = f"127.0.0.1:{free_port()}"
        argv = [
            sys.executable,  # flower-supernode, idle pull capped (fedlora-supernode)
            "-P",  # a module in the node's working directory must not shadow flwr's
            "-m",
            "fedlora.clients.supernode",
            "--grpc-rere",
            "--superlink",
            self.fleet_address,
            "--host",
            "127.0.0.1",
            "--port",
            runtime_address.rsplit(":", 1)[1],
            "--node-config",
            format_node_config(node_config),
        ]
        if warm:
            argv += ["--isolation", "process"]
        if tls and tls.get("ca"):
            argv += ["--root-certificates", tls["ca"]]
        elif tls is None:
            argv.append("--insecure")
        if auth_key is not None:
            argv += ["--auth-supernode-private-key", str(auth_key)]
        node = self.start(name, [*argv, *extra_args], cwd=cwd)
        if warm:
            self.workers[name] = self.start(
                f"{name}-worker",
                [
                    sys.executable,
                    "-m",
                    "fedlora.clients.warm_exec",
                    "--runtime-api-address",
                    runtime_address,
                    "--insecure",  # loopback, as Flower's own executor reaches it
                    "--parent-pid",
                    str(node.pid),
                ],
                cwd=cwd,
            )
        return node

    def register_node(self, public_key: str | Path) -> None:
        """Admit the SuperNode holding the private half of ``public_key`` (OpenSSH format)."""
        done = self.flwr("supernode", "register", str(public_key), self.connection)
        if done.returncode != 0:
            raise LaunchError(
                f"flwr supernode register {public_key} failed:\n{done.stdout}\n{done.stderr}"
            )

    def node_list(self) -> list[dict[str, Any]]:
        """The SuperNodes the SuperLink knows (``flwr supernode list``), with their status."""
        done = self.flwr("supernode", "list", self.connection, "--format", "json")
        try:
            return list(json.loads(done.stdout).get("nodes", []))
        except (json.JSONDecodeError, AttributeError):
            raise LaunchError(
                f"flwr supernode list failed:\n{done.stdout}\n{done.stderr}"
            ) from None

    def _write_connection(self, tls: Mapping[str, str] | None) -> None:
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            f'default = "{self.connection}"',
            "",
            f"[superlink.{self.connection}]",
            f'address = "{self.control_address}"',
        ]
        if tls and tls.get("ca"):
            lines.append(f'root-certificates = "{tls["ca"]}"')
        else:
            lines.append("insecure = true")
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this federation."""
        return subprocess.run(
            [str(BIN_DIR / "flwr"), *args],
            env=self.env,
            cwd=APP_DIR,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run_app(
        self,
        run_config: Mapping[str, Any],
        federation_config: Mapping[str, Any] | None = None,
        timeout: float = 3600.0,
        stream_to: IO[str] | None = None,
    ) -> dict[str, Any]:
        """``flwr run`` the app, stream its logs, and return the run's final status record.

        Raises :class:`LaunchError` when the run did not finish as completed.
        """
        argv = [
            str(BIN_DIR / "flwr"),
            "run",
            str(APP_DIR),
            self.connection,
            "--stream",
            "--run-config",
            format_run_config(run_config),
        ]
        if federation_config:
            argv += ["--federation-config", format_node_config(federation_config)]
        deadline = time.monotonic() + timeout
        proc = subprocess.Popen(
            argv,
            env=self.env,
            cwd=APP_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if stream_to is not None:
                    stream_to.write(line)
                    stream_to.flush()
                if time.monotonic() > deadline:
                    raise LaunchError(f"flwr run exceeded {timeout:.0f}s")
            proc.wait()
        finally:  # on a timeout or an interrupt: the CLI must not outlive this call
            if proc.poll() is None:
                stop_processes([psutil.Process(proc.pid)])
            if proc.stdout is not None:
                proc.stdout.close()
        return self.wait_for_run(deadline)

    def wait_for_run(self, deadline: float) -> dict[str, Any]:
        """Poll ``flwr ls`` until the latest run has finished; fail unless it completed."""
        while True:
            out = self.flwr("ls", self.connection, "--format", "json")
            try:
                runs = json.loads(out.stdout).get("runs", [])
            except json.JSONDecodeError:
                runs = []
            if runs:
                latest = max(runs, key=lambda r: r.get("pending-at", ""))
                status = str(latest.get("status", ""))
                if status.startswith("finished"):
                    if status != "finished:completed":
                        raise LaunchError(
                            f"Run {latest.get('run-id')} ended as {status}: "
                            f"{latest.get('status-details')}"
                        )
                    return latest
            if time.monotonic() > deadline:
                raise LaunchError(f"Run did not finish in time; last `flwr ls`: {out.stdout[:500]}")
            time.sleep(1.0)

    def stop_all(self) -> None:
        """Stop every process this federation started and every one they started, by PID.

        All at once (SIGTERM, a grace period, SIGKILL), so a ServerApp does not go on
        training while the SuperLink is being stopped; the processes are found by their
        PIDs and descendants and by :data:`MARKER`, wherever they were reparented.
        """
        marker = self.env.get(MARKER, "")
        procs = {p.pid: p for proc in self.processes for p in proc.tree()}
        procs.update({p.pid: p for p in marked_processes(marker)} if marker else {})
        stop_processes(list(procs.values()))
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=STOP_GRACE_SECONDS)
        if marker:  # anything started while the others were stopping
            stop_processes(marked_processes(marker))


@contextmanager
def local_federation(
    workdir: Path | None = None, threads: int = 1, offline: bool = True
) -> Iterator[LocalFederation]:
    """A private FLWR_HOME and working folder; every process is stopped on exit.

    Also on SIGTERM and SIGHUP (raised as :class:`Interrupted`) and Ctrl-C: the processes
    are stopped and the temporary folder is removed before the exception goes on. A bad
    polling interval in the environment is refused first (:mod:`fedlora.config.polling`).
    """
    check_polling()
    with interrupt_on_signals(), tempfile.TemporaryDirectory(prefix="fedlora-flwr-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        env = flower_env(root / "flwr-home", threads, offline=offline)
        fed = LocalFederation(workdir=root, env=env)
        try:
            yield fed
        finally:
            fed.stop_all()


def wait_for_port(address: str, proc: Process, timeout: float = 60.0) -> None:
    """Block until ``address`` accepts TCP connections, or fail with the process log."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise LaunchError(
                f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    raise LaunchError(
        f"{proc.name} did not open {address} within {timeout:.0f}s:\n{proc.log_tail()}"
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def format_run_config(config: Mapping[str, Any]) -> str:
    """``key=value`` pairs in the TOML syntax ``flwr run --run-config`` expects."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())


def format_node_config(config: Mapping[str, Any]) -> str:
    """Same syntax for ``--node-config`` and ``--federation-config``."""
    return format_run_config(config)


def _tls_args(tls: Mapping[str, str] | None) -> list[str]:
    if not tls:
        return ["--insecure"]
    return [
        "--ssl-ca-certfile",
        tls["ca"],
        "--ssl-certfile",
        tls["cert"],
        "--ssl-keyfile",
        tls["key"],
    ]


def describe(argv: Sequence[str]) -> str:
    """A copy-pasteable command line (for docs and error messages)."""
    return " ".join(shlex.quote(a) for a in argv)
