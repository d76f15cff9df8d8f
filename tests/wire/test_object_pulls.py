"""retry_sooner: flwr's pull functions, with a first retry on the poll's scale."""

from __future__ import annotations

import functools
import types

from flwr.supercore.inflatable import inflatable_utils

from fedlora.wire.object_pulls import retry_sooner


def _module() -> types.ModuleType:
    module = types.ModuleType("uses_flower_pulls")
    module.pull_objects = inflatable_utils.pull_objects
    module.pull_and_inflate_object_from_tree = inflatable_utils.pull_and_inflate_object_from_tree
    module.unrelated = len
    return module


def test_both_pull_functions_retry_sooner_and_nothing_else_changes():
    module = _module()
    assert retry_sooner(module, first_retry=0.1) == [
        "pull_objects",
        "pull_and_inflate_object_from_tree",
    ]
    for name in ("pull_objects", "pull_and_inflate_object_from_tree"):
        pulled = getattr(module, name)
        assert isinstance(pulled, functools.partial)
        assert pulled.func is getattr(inflatable_utils, name)
        assert pulled.keywords == {
            "initial_backoff": 0.1,
            "backoff_cap": 1.0,
            "max_tries_per_object": None,
        }
    assert module.unrelated is len
    assert inflatable_utils.pull_objects.__name__ == "pull_objects"  # flwr's own untouched


def test_twice_is_the_second_setting_not_a_nested_one():
    module = _module()
    retry_sooner(module, first_retry=0.1)
    retry_sooner(module, first_retry=2.0)
    assert module.pull_objects.func is inflatable_utils.pull_objects
    assert module.pull_objects.keywords["initial_backoff"] == 2.0
    assert module.pull_objects.keywords["backoff_cap"] == 2.0  # the cap is never below it


def test_a_name_that_is_not_flowers_is_left_alone():
    module = types.ModuleType("other")
    module.pull_objects = lambda *a, **k: {}
    assert retry_sooner(module, first_retry=0.1) == []


def test_the_partial_still_pulls(monkeypatch):
    attempts = []

    def pull(object_id: str) -> bytes:
        attempts.append(object_id)
        if len(attempts) < 3:
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return b"content"

    module = _module()
    retry_sooner(module, first_retry=0.01)
    assert module.pull_objects(["a"], pull) == {"a": b"content"}
    assert len(attempts) == 3
