"""Stopping what a command started: signals become interrupts, processes are found and ended.

The processes Flower and Ray start do not stay in one process tree or group, so a
federation's processes are found by PID and by an environment marker they all inherit,
and stopped together: SIGTERM, a grace period, SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psutil

MARKER = "FEDLORA_FEDERATION"
"""Environment variable that every process of one local federation inherits.

The processes Flower and Ray start do not stay in one process tree or group (the
SuperLink starts flower-superexec in a session of its own, Ray daemonises its raylet
and GCS server, and a parent that dies leaves its children to init), but they all
inherit their parent's environment: the marker finds every one of them to stop it.
"""

STOP_GRACE_SECONDS = 5.0
"""How long stopped processes get to exit after SIGTERM before they are SIGKILLed."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that every ``finally`` runs.

    CI cancellation, ``timeout``, Slurm and systemd stop a job with SIGTERM; without a
    handler Python dies at once and leaves the federation it started running.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Interrupted` while the block runs.

    Only in the main thread (the only one Python delivers signals to); elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        for sig in previous:  # one is enough: the clean-up must not be interrupted in turn
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def marked_processes(marker: str) -> list[psutil.Process]:
    """Every process whose environment carries ``MARKER=marker`` (this one excluded)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(MARKER) == marker:
                found.append(proc)
    return found


def stop_processes(procs: Sequence[psutil.Process], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM every process, then SIGKILL those still alive after ``grace`` seconds."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)
