"""Clients of a SuperNode's Runtime API, built as Flower's own processes build them.

The warm executor claims tasks as ``flower-superexec`` does (no token) and the warm
worker runs them as ``flwr-clientapp`` does (with the task's token), with Flower's HTTP
client and interceptors, so the SuperNode cannot tell them from its own processes.

One difference: the retry policy. Flower's (``make_simple_http_retry_invoker``) sends
SIGINT to its own process on HTTP 401 (a revoked token) and raises a ``BaseException``
on 403, which is right for a one-task ``flwr-clientapp`` and fatal for a process that
serves task after task. Here transport errors and 503/504 are retried (for a bounded
time with a token), and any other HTTP error is raised as ``httpx.HTTPStatusError``
for the caller to handle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import httpx
from flwr.common.constant import MAX_RETRY_DELAY
from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.tls import validate_and_resolve_root_certificates

TASK_RETRY_SECONDS = 60.0
"""How long a task's calls are retried while the SuperNode is unreachable."""
_RETRYABLE_STATUS = frozenset({httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT})
# the methods Flower's SuperExec signs when the SuperNode has a SuperExec auth secret
_SUPEREXEC_METHODS = frozenset(
    {
        "/flwr.proto.Runtime/AcquireTask",
        "/flwr.proto.Runtime/PullPendingTasks",
        "/flwr.proto.Runtime/ClaimTask",
    }
)


@dataclass(frozen=True)
class RuntimeAddress:
    """Where the SuperNode's Runtime API listens and how to reach it."""

    address: str
    insecure: bool = True
    root_certificates: str | None = None
    superexec_secret_file: str | None = None


def retry_invoker(max_time: float | None) -> RetryInvoker:
    """Retry transport errors and 503/504 for up to ``max_time`` seconds (None: forever)."""

    def give_up(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in _RETRYABLE_STATUS
        return any(term in str(exc).lower() for term in ("certificate", "ssl", "tls"))

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=MAX_RETRY_DELAY),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=max_time,
        should_giveup=give_up,
    )


def runtime_client(runtime: RuntimeAddress, token: str | None = None) -> RuntimeHttpClient:
    """An HTTP client of the Runtime API: the executor's (no token) or one task's."""
    interceptors: list = [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")
    ]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    elif runtime.superexec_secret_file:
        secret = Path(runtime.superexec_secret_file).read_bytes()
        interceptors.append(
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=_SUPEREXEC_METHODS)
        )
    return RuntimeHttpClient.from_server_address(
        server_address=runtime.address,
        insecure=runtime.insecure,
        root_certificates=validate_and_resolve_root_certificates(
            runtime.root_certificates, runtime.insecure
        ),
        interceptors=interceptors,
        retry_invoker=retry_invoker(TASK_RETRY_SECONDS if token else None),
    )


def heartbeat_fn(client: RuntimeHttpClient) -> Callable[[], bool]:
    """A task heartbeat that never signals the (long-lived) process it runs in.

    Flower's raises SIGINT in ``flwr-clientapp`` when the SuperNode no longer knows the
    task (its run was stopped); here that is logged, and the task's own calls fail.
    """
    request = SendTaskHeartbeatRequest()

    def send() -> bool:
        try:
            response = client.SendTaskHeartbeat(request)
        except httpx.HTTPError as err:
            log(WARNING, "fedlora-worker: task heartbeat failed: %s", err)
            return False
        if not response.success:
            log(WARNING, "fedlora-worker: the SuperNode no longer knows this task")
        return True

    return send
