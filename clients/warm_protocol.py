"""What the warm executor and its worker say to each other: JSON lines on a socket pair.

The executor (:mod:`fedlora.clients.warm_exec`) claims a task from the SuperNode and
hands its token to the long-lived worker (:mod:`fedlora.clients.warm_worker`), which
runs the ClientApp and says when it has pulled the message and when it is done. Nothing
is pickled: each line is one JSON object, and the one binary field (the pulled message's
metadata, so that the executor can answer for a worker that dies) is a protobuf the
executor parses with Flower's own serde. The socket pair is unnamed (no file, no port):
only the two processes hold it.
"""

from __future__ import annotations

import json
import socket
from typing import Any

MAX_LINE = 1 << 20
"""Longest line either side accepts (a token, or a message's metadata, is far shorter)."""

TASK = "task"
"""Executor -> worker: run the task of ``token``."""
READY = "ready"
"""Worker -> executor: imports done, waiting for a task (sent once, at start)."""
PULLED = "pulled"
"""Worker -> executor: the task's message is pulled (its metadata, base64 protobuf)."""
REPLIED = "replied"
"""Worker -> executor: the reply is pushed (the executor must not answer for it again)."""
DONE = "done"
"""Worker -> executor: the reply and the task's output are pushed."""


class LineChannel:
    """One end of the socket pair, read and written a JSON object per line."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    def send(self, kind: str, **fields: Any) -> None:
        """Write one event."""
        self.sock.sendall(json.dumps({"kind": kind, **fields}).encode("utf-8") + b"\n")

    def receive(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None when ``timeout`` passed first.

        ``EOFError`` when the other end closed (or died). A line that is not a JSON
        object, or longer than :data:`MAX_LINE`, raises ``ValueError``: the other end is
        not speaking this protocol.
        """
        self.sock.settimeout(timeout)
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                raise ValueError(f"line longer than {MAX_LINE} bytes")
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except OSError as err:  # reset by a killed peer
                raise EOFError(str(err)) from err
            if not chunk:
                raise EOFError("the other end closed the channel")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        event = json.loads(line.decode("utf-8"))
        if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
            raise ValueError(f"not an event: {line[:80]!r}")
        return event

    def close(self) -> None:
        """Close this end."""
        self.sock.close()
