"""send_and_collect: the replies of a deployment grid, pulled on a short poll."""

from __future__ import annotations

import functools

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.inflatable import inflatable_utils
from flwr.superlink.grid import http_grid

from fedlora.config import ConfigError
from fedlora.server.messaging import check_reply_poll, send_and_collect


@pytest.fixture(autouse=True)
def restore_pull_objects(monkeypatch):
    """send_and_collect retunes http_grid's object pulls; undo it after each test."""
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class ScheduledGrid(http_grid.HttpGrid):
    """A deployment grid whose node ``n`` replies ``delays[n]`` s after the push (``None``:
    never); no SuperLink behind it."""

    def __init__(self, delays: dict[int, float | None], clock: FakeClock) -> None:
        self.delays, self.clock = delays, clock
        self.pushed: dict[str, Message] = {}
        self.pulls = 0
        self.delivered: set[str] = set()

    def set_run(self, run_id: int) -> None:  # pragma: no cover - unused
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover - unused
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover - unused
        raise NotImplementedError

    def get_node_ids(self):
        return sorted(self.delays)

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{i}"
            msg.metadata.__dict__["_message_id"] = mid  # what the SuperLink assigns on push
            self.pushed[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in sorted(message_ids):
            msg = self.pushed[mid]
            delay = self.delays[msg.metadata.dst_node_id]
            if mid in self.delivered or delay is None or self.clock.now < delay:
                continue
            self.delivered.add(mid)
            reply = Message(
                RecordDict({"r": ConfigRecord({"node": msg.metadata.dst_node_id})}), reply_to=msg
            )
            out.append(reply)
        return out

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - must not be used
        raise AssertionError("send_and_collect must not use send_and_receive on a deployment grid")


def _messages(nodes):
    return [
        Message(
            RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type=MessageType.QUERY
        )
        for n in nodes
    ]


def _nodes(replies):
    return [int(r.content["r"]["node"]) for r in replies]


def test_collects_every_reply_within_one_poll_of_its_arrival():
    clock = FakeClock()
    grid = ScheduledGrid({1: 0.05, 2: 1.0, 3: 7.3}, clock)
    replies = send_and_collect(
        grid, _messages([1, 2, 3]), timeout=60, poll=0.2, clock=clock, sleep=clock.sleep
    )
    assert sorted(_nodes(replies)) == [1, 2, 3]
    assert _nodes(replies) == [1, 2, 3]  # arrival order
    # the last reply was seen less than one poll after it arrived (Flower's own pulls every 3 s)
    assert 7.3 <= clock.now < 7.3 + 0.2 + 1e-9
    assert all(s <= 0.2 for s in clock.sleeps)


def test_stops_at_the_timeout_with_the_replies_so_far():
    clock = FakeClock()
    grid = ScheduledGrid({1: 0.5, 2: None}, clock)
    replies = send_and_collect(
        grid, _messages([1, 2]), timeout=2.0, poll=0.3, clock=clock, sleep=clock.sleep
    )
    assert _nodes(replies) == [1]
    assert abs(clock.now - 2.0) < 1e-9  # the last sleep is cut to the deadline, not past it


def test_no_timeout_waits_for_all():
    clock = FakeClock()
    grid = ScheduledGrid({1: 100.0, 2: 250.0}, clock)
    replies = send_and_collect(
        grid, _messages([1, 2]), timeout=None, poll=0.5, clock=clock, sleep=clock.sleep
    )
    assert sorted(_nodes(replies)) == [1, 2]
    assert 250.0 <= clock.now < 250.5 + 1e-9


def test_a_reply_is_not_returned_twice():
    clock = FakeClock()
    grid = ScheduledGrid({1: 0.0, 2: 3.0}, clock)
    replies = send_and_collect(
        grid, _messages([1, 2]), timeout=10, poll=0.2, clock=clock, sleep=clock.sleep
    )
    assert sorted(_nodes(replies)) == [1, 2]
    assert grid.pulls > 2


class ReceiveOnly:
    """A stand-in that offers only send_and_receive (as the suite's fake grids do)."""

    def __init__(self) -> None:
        self.calls: list[float | None] = []

    def send_and_receive(self, messages, timeout=None):
        self.calls.append(timeout)
        return [Message(RecordDict(), reply_to=m) for m in messages]


def test_a_grid_without_push_and_pull_is_used_as_it_is():
    grid = ReceiveOnly()
    replies = send_and_collect(grid, _messages([4, 5]), timeout=9.0)  # type: ignore[arg-type]
    assert len(replies) == 2 and grid.calls == [9.0]


def test_a_generator_of_messages_is_sent_whole():
    clock = FakeClock()
    grid = ScheduledGrid({1: 0.0, 2: 0.0}, clock)
    replies = send_and_collect(
        grid, (m for m in _messages([1, 2])), timeout=5, clock=clock, sleep=clock.sleep
    )
    assert sorted(_nodes(replies)) == [1, 2]


def test_replies_still_uploading_are_retried_on_the_poll_scale():
    clock = FakeClock()
    send_and_collect(
        ScheduledGrid({1: 0.0}, clock),
        _messages([1]),
        timeout=5,
        poll=0.3,
        clock=clock,
        sleep=clock.sleep,
    )
    pulls = http_grid.pull_objects
    assert isinstance(pulls, functools.partial) and pulls.func is inflatable_utils.pull_objects
    assert pulls.keywords["initial_backoff"] == 0.3 and pulls.keywords["backoff_cap"] == 1.0
    assert pulls.keywords["max_tries_per_object"] is None  # PULL_MAX_TIME still bounds it


def test_a_bad_reply_poll_is_refused_when_the_run_starts(monkeypatch):
    monkeypatch.setenv("FEDLORA_REPLY_POLL", "never")
    with pytest.raises(ConfigError, match="FEDLORA_REPLY_POLL: 'never'"):
        check_reply_poll(ScheduledGrid({}, FakeClock()))
    check_reply_poll(ReceiveOnly())  # type: ignore[arg-type]  # a grid that does not poll
