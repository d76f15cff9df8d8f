"""Send a round's messages and collect the replies as soon as they arrive.

Flower 1.39's deployment grid (``HttpGrid`` in ``superlink/grid/http_grid.py``) pulls
replies in ``send_and_receive`` every 3 s, so the last reply of every exchange waits
1.5 s on average (up to 3 s) before the ServerApp sees it (docs/benchmarks.md, section
6). :func:`send_and_collect` does what ``send_and_receive`` does through the grid's
public ``push_messages`` and ``pull_messages``, with a short poll (0.2 s, or
``FEDLORA_REPLY_POLL`` in the ServerApp's environment; 3 gives Flower's own), and
retries a reply whose arrays are still uploading on the same scale
(:mod:`fedlora.wire.object_pulls`). A pull is one small request to the SuperLink.

Only ``HttpGrid`` takes this path; simulation's ``InMemoryGrid`` already polls every
0.1 s, and any other grid (tests' stand-ins, a wrapper) is used as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid import http_grid

from fedlora.config.polling import REPLY_POLL_ENV, poll_seconds
from fedlora.wire.object_pulls import retry_sooner


def check_reply_poll(grid: Grid) -> None:
    """Refuse a bad ``FEDLORA_REPLY_POLL`` when the run starts, not at its first exchange."""
    if isinstance(grid, http_grid.HttpGrid):
        poll_seconds(REPLY_POLL_ENV)


def send_and_collect(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None,
    *,
    poll: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Message]:
    """Push ``messages``; return the replies that arrive within ``timeout`` s (``None``: all).

    Same contract as ``Grid.send_and_receive``: replies come back in arrival order, a
    message whose reply does not come in time has none, and a reply stays valid on the
    SuperLink until its TTL whatever the timeout. ``poll``: default
    ``FEDLORA_REPLY_POLL`` or 0.2 s.
    """
    messages = list(messages)  # push_messages iterates twice
    if not isinstance(grid, http_grid.HttpGrid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    poll = poll_seconds(REPLY_POLL_ENV) if poll is None else poll
    retry_sooner(http_grid, first_retry=poll)
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else clock() + timeout
    replies: list[Message] = []
    while waiting:
        arrived = list(grid.pull_messages(waiting))
        replies.extend(arrived)
        waiting.difference_update(m.metadata.reply_to_message_id for m in arrived)
        if not waiting or (deadline is not None and clock() >= deadline):
            break
        sleep(poll if deadline is None else max(0.0, min(poll, deadline - clock())))
    return replies
