"""fedlora-supernode: Flower's SuperNode loop with its idle wait capped, and nothing else."""

from __future__ import annotations

import functools
import importlib
import sys
import time

import pytest
from flwr.supernode import start_client_internal as loop

from fedlora.clients import supernode
from fedlora.config.polling import IDLE_PULL_ENV


@pytest.fixture
def restore_loop(monkeypatch):
    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)


def test_the_cap_reaches_the_supernode_loop_and_only_it(restore_loop, monkeypatch):
    slept: list[float] = []
    assert supernode.cap_idle_pull(0.5) is True
    monkeypatch.setattr(time, "sleep", slept.append)
    loop.time.sleep(3)  # the idle pull of flwr 1.39's loop
    loop.time.sleep(0.2)  # shorter waits keep their length
    assert slept == [0.5, 0.2]
    assert loop.time.monotonic is time.monotonic  # the rest of `time` is the real one
    assert sys.modules["time"] is time  # the global module is not replaced
    pulls = loop.pull_objects  # a message still uploading is retried on the same scale
    assert isinstance(pulls, functools.partial) and pulls.keywords["initial_backoff"] == 0.5


def test_the_loop_flower_supernode_runs_is_the_one_capped():
    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    assert cli.start_client_internal.__globals__ is vars(loop)


def test_the_loop_still_has_the_waits_this_caps():
    # fails when a new Flower changes the loop: re-read it before raising the pin
    assert supernode._loop_waits(loop) == supernode.FLOWER_WAITS


def test_an_unknown_loop_is_left_unchanged_with_a_warning(restore_loop, monkeypatch):
    monkeypatch.setattr(supernode, "FLOWER_WAITS", {"3", "0.5", "30"})
    with pytest.warns(UserWarning, match="unchanged"):
        assert supernode.cap_idle_pull(0.5) is False
    assert loop.time is time


def test_a_loop_without_source_is_left_unchanged_with_a_warning(restore_loop, monkeypatch):
    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(supernode.inspect, "getsource", no_source)
    with pytest.warns(UserWarning, match="unchanged"):
        assert supernode.cap_idle_pull(0.5) is False
    assert loop.time is time


def test_a_bad_interval_stops_the_supernode_naming_it(monkeypatch):
    monkeypatch.setenv(IDLE_PULL_ENV, "soon")
    with pytest.raises(SystemExit, match=f"{IDLE_PULL_ENV}: 'soon'"):
        supernode.main()
