"""The warm worker's Runtime API clients survive what ends a one-task ``flwr-clientapp``."""

from __future__ import annotations

import http.server
import threading

import httpx
import pytest
from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

from fedlora.clients.warm_exec import answer_for
from fedlora.clients.warm_protocol import LineChannel
from fedlora.clients.warm_runtime import RuntimeAddress, heartbeat_fn, runtime_client


class _Refuse(http.server.BaseHTTPRequestHandler):
    """A Runtime API that answers every call with 401: a revoked or unknown token."""

    calls = 0

    def do_POST(self):
        type(self).calls += 1
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_):
        pass


@pytest.fixture
def refusing_runtime():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Refuse.calls = 0
    yield RuntimeAddress(f"127.0.0.1:{server.server_address[1]}")
    server.shutdown()


def test_a_revoked_token_raises_instead_of_signalling_the_process(refusing_runtime):
    """Flower's own retry policy sends SIGINT to its process on 401 (right for a one-task
    process); a warm worker's must raise, so the worker and its executor go on."""
    client = runtime_client(refusing_runtime, "revoked-token")
    with pytest.raises(httpx.HTTPStatusError):
        client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
    assert heartbeat_fn(client)() is False  # a heartbeat on it fails quietly
    answer_for(client, None, False, "the worker died")  # logs, never raises or signals
    client.close()
    assert _Refuse.calls >= 3


def test_the_channel_refuses_what_is_not_a_json_event():
    import socket

    ours, theirs = socket.socketpair()
    channel = LineChannel(ours)
    theirs.sendall(b'{"kind": "ready", "pid": 7}\n[1, 2]\n')
    assert channel.receive(timeout=1) == {"kind": "ready", "pid": 7}
    with pytest.raises(ValueError, match="not an event"):
        channel.receive(timeout=1)
    assert channel.receive(timeout=0.05) is None  # nothing more yet
    theirs.close()
    with pytest.raises(EOFError):
        channel.receive(timeout=1)
