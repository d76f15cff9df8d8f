"""The warm worker: one long-lived process that runs a SuperNode's ClientApp tasks.

Flower 1.39 starts a fresh ``flwr-clientapp`` process for every message, which imports
torch, transformers and peft and rebuilds the model each round. This process does what
``flwr-clientapp`` does for one task (``flwr.supernode.runtime.run_clientapp``: pull the
task's input over the SuperNode's Runtime API with the task's token, run the ClientApp,
push the reply and the task's output), but for task after task, so the imports, the
base model (on its device, quantised if asked), the tokenizer and the tokenised
partition stay loaded between messages, and between runs of the same app build (FAB)
with the same base (the process caches in :mod:`fedlora.model.models` and
:mod:`fedlora.clients.node_data` keep the latest, keyed by the files they were read
from).

It runs the fedlora installed on the node, not the copy in the run's FAB (it imported
it before the first task): a FAB of another fedlora version is answered with an error
naming both versions. Started and supervised by :mod:`fedlora.clients.warm_exec`, which
hands it tokens over a socket pair (:mod:`fedlora.clients.warm_protocol`) and keeps
each task's heartbeat; it dies with its executor.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import socket
import sys
import time
from logging import ERROR, INFO

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.app.message import remove_content_from_message
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import message_to_proto
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run
from flwr.supernode.runtime import run_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

import fedlora
from fedlora.clients.warm_protocol import DONE, PULLED, READY, REPLIED, TASK, LineChannel
from fedlora.clients.warm_runtime import RuntimeAddress, runtime_client
from fedlora.wire.object_pulls import retry_sooner

READY_ENV = "FEDLORA_PROCESS_READY"
"""Set by the worker when its imports are done: the ClientApp's start cost ends there."""


class Worker:
    """Runs tasks; keeps the ClientApp of the FAB it serves loaded between them."""

    def __init__(self, runtime: RuntimeAddress) -> None:
        self.runtime = runtime
        self.fab_hash: str | None = None
        self.app: ClientApp | None = None
        self.tasks = 0

    def client_app(self, run: Run, fab: Fab) -> ClientApp:
        """The FAB's ClientApp, installed and loaded on the first task of that FAB."""
        if run.fab_version != fedlora.__version__:
            raise LoadClientAppError(
                f"the run ships fedlora {run.fab_version} and this node's warm worker runs the "
                f"installed fedlora {fedlora.__version__}: install the same version here, or "
                "start this SuperNode without --isolation process (a process per message)"
            )
        if self.app is None or fab.hash_str != self.fab_hash:
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.app = load(run.fab_id, run.fab_version, fab.hash_str)
            self.fab_hash = fab.hash_str
        return self.app

    def run_task(self, token: str, channel: LineChannel) -> str:
        """Run the task of ``token`` as ``flwr-clientapp`` would; its final sub-status.

        Nothing a task does ends the worker: every failure becomes the reply's error (if
        the message was pulled) and the task's FAILED status, as in ``run_clientapp``.
        """
        client = runtime_client(self.runtime, token)
        context: Context | None = None
        reply: Message | None = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed before it started"
        try:
            message, context, run, fab = pull_task_input(client)
            channel.send(
                PULLED,
                metadata=_metadata(message),
                node_id=context.node_id,
                run_id=context.run_id,
            )
            log(INFO, "fedlora worker %d: %s message", os.getpid(), message.metadata.message_type)
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            try:
                app = self.client_app(run, fab)
                code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
                reply = app(message=message, context=context)
                sub_status, details = SubStatus.COMPLETED, ""
            except Exception as ex:
                log(ERROR, "ClientApp raised an exception", exc_info=ex)
                details = f"{type(ex)}:<'{ex}'>"  # Flower's own format for this error
                reply = Message(Error(code=code, reason=details), reply_to=message)
        except Exception as ex:
            log(ERROR, "fedlora worker: the task failed", exc_info=ex)
            details = f"{type(ex)}:<'{ex}'>"
        finally:
            if reply is not None and context is not None:
                try:
                    push_message(client, reply, context)
                    channel.send(REPLIED)
                except Exception as ex:
                    log(ERROR, "fedlora worker: failed to push the reply", exc_info=ex)
                    sub_status = SubStatus.FAILED
            try:
                push_task_output(client, context, sub_status, details)
            except Exception as ex:
                log(ERROR, "fedlora worker: failed to push the task output", exc_info=ex)
            client.close()
            self.tasks += 1
            gc.collect()  # what the task held goes now, not when the next one needs room
        return str(sub_status)


def _metadata(message: Message) -> str:
    """The message without its content, as base64 protobuf (for an error reply by proxy)."""
    proto = message_to_proto(remove_content_from_message(message))
    return base64.b64encode(proto.SerializeToString()).decode("ascii")


TASK_PULL_RETRY_SECONDS = 0.1
"""First retry of a task's arrays not yet in the SuperNode's store (Flower's: 1 s)."""


def _prewarm() -> None:
    """Import what every task needs, before the first task arrives."""
    import fedlora.clients.app
    import fedlora.clients.job  # noqa: F401  (torch, transformers, peft)


def main(argv: list[str] | None = None) -> None:
    """Serve tasks handed over the socket pair until the executor closes it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="this end of the socket pair")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    args = parser.parse_args(argv)
    start_parent_process_monitor(os.getppid())  # never outlive the executor
    channel = LineChannel(socket.socket(fileno=args.fd))
    # the SuperNode offers a task before it has pulled the message's arrays from the SuperLink
    retry_sooner(run_clientapp, first_retry=TASK_PULL_RETRY_SECONDS)
    _prewarm()
    os.environ[READY_ENV] = repr(time.time())
    worker = Worker(RuntimeAddress(args.runtime_api_address, args.insecure, args.root_certificates))
    channel.send(READY, pid=os.getpid())
    log(INFO, "fedlora worker %d: ready", os.getpid())
    while True:
        try:
            event = channel.receive()
        except (EOFError, ValueError):
            return
        if event is None or event["kind"] != TASK or not isinstance(event.get("token"), str):
            continue
        status = worker.run_task(event["token"], channel)
        channel.send(DONE, status=status, tasks=worker.tasks)


if __name__ == "__main__":
    main(sys.argv[1:])
