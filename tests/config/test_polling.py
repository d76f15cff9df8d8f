"""The polling intervals fedlora sets in place of Flower's 3 s: defaults and bad values."""

from __future__ import annotations

import pytest

from fedlora.config import ConfigError
from fedlora.config.polling import IDLE_PULL_ENV, REPLY_POLL_ENV, check_polling, poll_seconds


@pytest.mark.parametrize(("name", "default"), [(REPLY_POLL_ENV, 0.2), (IDLE_PULL_ENV, 0.5)])
def test_defaults_and_values(name, default):
    assert poll_seconds(name, {}) == default
    assert poll_seconds(name, {name: "3"}) == 3.0
    assert poll_seconds(name, {name: "0.05"}) == 0.05


@pytest.mark.parametrize("name", [REPLY_POLL_ENV, IDLE_PULL_ENV])
@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "soon", "61", ""])
def test_a_bad_value_names_the_variable_and_the_value(name, raw):
    with pytest.raises(ConfigError, match=f"{name}: {raw!r}"):
        poll_seconds(name, {name: raw})
    with pytest.raises(ConfigError, match=name):
        check_polling({name: raw})


def test_check_passes_when_unset():
    check_polling({})
