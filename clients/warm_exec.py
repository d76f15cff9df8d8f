"""``fedlora-worker``: a SuperNode's executor that keeps its ClientApp warm across rounds.

Flower's extension point for how a SuperNode runs its ClientApp is the executor behind
``--isolation process``: the SuperNode then starts no process itself but serves its
Runtime API, and an executor claims each task (``AcquireTask``) and runs it with the
task's token. Flower's own executor, ``flower-superexec``, starts a fresh
``flwr-clientapp`` for every task; its warm executors are single-use and Kubernetes-only
(flwr 1.39, ``supercore/superexec/executor``). This executor hands every task to one
long-lived worker (:mod:`fedlora.clients.warm_worker`) instead, and supervises it:

- a worker that dies, or runs a task past ``--task-timeout`` or the message's TTL, is
  killed if need be and restarted, and the node's reply to that message is an error
  with the reason (sent here, with the task's token, from the message's metadata the
  worker reported), so the round goes on without this node rather than waiting for it;
- the executor keeps each task's heartbeat from the claim on, and claims a task only
  while the worker is idle: tasks run one at a time, as a node trains one round at a
  time;
- a task of another FAB gets a fresh worker. The worker runs the fedlora installed on
  the node (docs/deployment.md): a FAB of another version is answered with an error.

Usage, beside ``flower-supernode --isolation process --host 127.0.0.1 --port 9094``::

    fedlora-worker --runtime-api-address 127.0.0.1:9094 --insecure
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedlora.clients.warm_protocol import DONE, PULLED, READY, REPLIED, TASK, LineChannel
from fedlora.clients.warm_runtime import RuntimeAddress, heartbeat_fn, runtime_client

DEFAULT_TASK_TIMEOUT = 3600.0
"""Seconds one task may run before its worker counts as hung (a long local round fits)."""
STARTUP_TIMEOUT = 600.0
"""Seconds a fresh worker may take to import torch, transformers and peft."""
POLL_SECONDS = 0.1
"""How often an idle executor asks the SuperNode for a task (Flower's default: 1 s)."""


@dataclass
class WorkerProcess:
    """A started worker and the executor's end of its socket pair."""

    popen: subprocess.Popen
    channel: LineChannel
    fab_hash: str | None = None

    @property
    def pid(self) -> int:
        """The worker's OS process id."""
        return self.popen.pid

    def stop(self) -> None:
        """Kill the worker (it holds nothing that is not on disk) and reap it."""
        with contextlib.suppress(OSError):
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self.channel.close()


def start_worker(runtime: RuntimeAddress) -> WorkerProcess:
    """Start a worker and wait until its imports are done."""
    ours, theirs = socket.socketpair()
    argv = [
        sys.executable,
        "-m",
        "fedlora.clients.warm_worker",
        "--fd",
        str(theirs.fileno()),
        "--runtime-api-address",
        runtime.address,
    ]
    if runtime.insecure:
        argv.append("--insecure")
    elif runtime.root_certificates:
        argv += ["--root-certificates", runtime.root_certificates]
    popen = subprocess.Popen(argv, pass_fds=[theirs.fileno()])
    theirs.close()
    worker = WorkerProcess(popen, LineChannel(ours))
    try:
        event = worker.channel.receive(timeout=STARTUP_TIMEOUT)
    except (EOFError, ValueError):
        event = None
    if event is None or event["kind"] != READY:
        code = popen.poll()
        worker.stop()
        raise RuntimeError(f"the fedlora worker did not start (exit code {code})")
    log(INFO, "fedlora-worker: worker %d ready", worker.pid)
    return worker


def _reply_metadata(pulled: dict) -> tuple[Message, Context]:
    """The pulled message (metadata only) and a Context naming its node and run."""
    proto = ProtoMessage.FromString(base64.b64decode(pulled["metadata"], validate=True))
    context = Context(
        run_id=int(pulled["run_id"]),
        node_id=int(pulled["node_id"]),
        node_config={},
        state=RecordDict(),
        run_config={},
    )
    return message_from_proto(proto), context


def answer_for(client: RuntimeHttpClient, pulled: dict | None, replied: bool, reason: str) -> None:
    """Answer for a worker that died, hung or never started: an error reply with ``reason``.

    Without it the SuperNode would notice only when the task's heartbeat lapses, and the
    server would learn no reason. A task whose message the worker did not pull yet is
    pulled here (as ``flwr-clientapp`` answers a ClientApp it cannot load); one whose
    reply was already pushed is only marked failed. ``push_task_output`` gets no
    Context: the node's Context keeps what the last completed task left.
    """
    try:
        if pulled is None:
            message, context, _run, _fab = pull_task_input(client)
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
        else:
            message, context = _reply_metadata(pulled)
            code = ErrorCode.CLIENT_APP_CRASHED
        if not replied:
            push_message(
                client, Message(Error(code=code, reason=reason), reply_to=message), context
            )
    except Exception as err:
        log(ERROR, "fedlora-worker: could not send the error reply: %s", err)
    try:
        push_task_output(client, None, SubStatus.FAILED, reason)
    except Exception as err:
        log(ERROR, "fedlora-worker: could not mark the task failed: %s", err)


def _ttl_deadline(pulled: dict, default: float) -> float:
    """The earlier of ``default`` and the pulled message's expiry, on the monotonic clock."""
    try:
        message, _ = _reply_metadata(pulled)
        expires = float(message.metadata.created_at) + float(message.metadata.ttl)
    except Exception:
        return default
    return min(default, time.monotonic() + (expires - time.time()))


class WarmExecutor:
    """Claims the SuperNode's ClientApp tasks and runs them in one supervised worker."""

    def __init__(self, runtime: RuntimeAddress, task_timeout: float = DEFAULT_TASK_TIMEOUT) -> None:
        self.runtime = runtime
        self.task_timeout = task_timeout
        self.worker: WorkerProcess | None = None
        self.restarts = 0

    def ensure_worker(self, fab_hash: str | None = None) -> WorkerProcess:
        """The running worker, restarted if it died or serves another FAB."""
        worker = self.worker
        if worker is not None and worker.popen.poll() is None:
            if fab_hash is None or worker.fab_hash in (None, fab_hash):
                worker.fab_hash = fab_hash or worker.fab_hash
                return worker
            log(INFO, "fedlora-worker: a new FAB (%s): fresh worker", fab_hash[:12])
        if worker is not None:
            worker.stop()
            self.restarts += 1
        self.worker = None
        self.worker = start_worker(self.runtime)
        self.worker.fab_hash = fab_hash
        return self.worker

    def dispatch(self, token: str, fab_hash: str | None) -> None:
        """Run one task in the worker; answer for it if the worker dies, hangs or fails to start.

        The task's heartbeat is kept here from the claim on, so a worker that is still
        importing (a new FAB) does not let the claim lapse.
        """
        client = runtime_client(self.runtime, token)
        heartbeat = HeartbeatSender(heartbeat_fn(client))
        heartbeat.start()
        try:
            reason = self._run(token, fab_hash, client)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
        if reason:
            log(WARNING, "fedlora-worker: %s", reason)

    def _run(self, token: str, fab_hash: str | None, client: RuntimeHttpClient) -> str:
        """The task in the worker; the reason it failed there, or ""."""
        try:
            worker = self.ensure_worker(fab_hash)
        except (RuntimeError, OSError) as err:
            reason = f"the fedlora worker could not start: {err}"
            answer_for(client, None, False, reason)
            return reason
        pulled: dict | None = None
        replied = False
        deadline = time.monotonic() + self.task_timeout
        reason = ""
        try:
            worker.channel.send(TASK, token=token)
        except OSError:
            reason = f"the fedlora worker (PID {worker.pid}) was gone before the task"
        while not reason:
            try:
                event = worker.channel.receive(timeout=1.0)
            except (EOFError, ValueError):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.popen.wait(timeout=5)
                code = worker.popen.poll()
                reason = (
                    f"the fedlora worker (PID {worker.pid}) died during the task "
                    f"(exit code {code}); it is restarted for the next message"
                )
                break
            if event is None:
                if time.monotonic() > deadline:
                    reason = (
                        f"the fedlora worker (PID {worker.pid}) ran the task past its deadline "
                        f"(--task-timeout={self.task_timeout:g}s or the message's TTL); "
                        "it is restarted"
                    )
                continue
            if event["kind"] == PULLED:
                pulled = event
                deadline = _ttl_deadline(pulled, deadline)
            elif event["kind"] == REPLIED:
                replied = True
            elif event["kind"] == DONE:
                return ""
        worker.stop()
        self.worker = None
        self.restarts += 1
        answer_for(client, pulled, replied, reason)
        return reason

    def serve_forever(self) -> None:
        """Claim and run tasks until stopped (SIGINT, SIGTERM or the SuperNode exits)."""
        client = runtime_client(self.runtime)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        try:
            while True:
                try:
                    self.ensure_worker()  # warm before the first task is claimed
                    response = client.AcquireTask(request)
                    if response.HasField("task") and response.token:
                        self.dispatch(response.token, response.task.fab_hash or None)
                        continue
                except Exception as err:
                    log(ERROR, "fedlora-worker: %s: %s; retrying", type(err).__name__, err)
                    time.sleep(1.0)
                time.sleep(POLL_SECONDS)
        finally:
            client.close()
            if self.worker is not None:
                self.worker.stop()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``fedlora-worker``."""
    parser = argparse.ArgumentParser(
        prog="fedlora-worker",
        description="Run a SuperNode's ClientApp tasks in one warm, supervised process "
        "(start the SuperNode with --isolation process).",
    )
    parser.add_argument(
        "--runtime-api-address",
        required=True,
        help="the SuperNode's Runtime API (its --host:--port), e.g. 127.0.0.1:9094",
    )
    parser.add_argument("--insecure", action="store_true", help="the Runtime API without TLS")
    parser.add_argument("--root-certificates", help="CA of the Runtime API's TLS certificate")
    parser.add_argument(
        "--task-timeout",
        type=float,
        default=DEFAULT_TASK_TIMEOUT,
        help=f"seconds before a task counts as hung (default {DEFAULT_TASK_TIMEOUT:g})",
    )
    parser.add_argument(
        "--superexec-auth-secret-file",
        help="the SuperNode's SuperExec auth secret (when it was started with one)",
    )
    parser.add_argument(
        "--parent-pid", type=int, help="exit when this process (the SuperNode) does"
    )
    args = parser.parse_args(argv)
    if not args.insecure and not args.root_certificates:
        parser.error("give --insecure (a Runtime API on loopback) or --root-certificates")
    if not args.task_timeout > 0:
        parser.error(f"--task-timeout must be positive, got {args.task_timeout}")
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # finally: the worker goes too
    runtime = RuntimeAddress(
        args.runtime_api_address,
        args.insecure,
        args.root_certificates,
        args.superexec_auth_secret_file,
    )
    log(INFO, "fedlora-worker %d: serving %s", os.getpid(), runtime.address)
    with contextlib.suppress(KeyboardInterrupt):
        WarmExecutor(runtime, args.task_timeout).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
