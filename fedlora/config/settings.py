"""A strategy's own settings: a frozen dataclass filled from ``strategy-options``.

A strategy declares ``Settings`` (fields with defaults; ``__post_init__`` rejects bad
values); ``strategy-options = "fair-method=cosine,fair-lambda=0.01"`` is parsed into it,
each value coerced to its field's type, and a key the strategy does not have is refused
with the closest known names, before any round runs.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from fedlora.config.values import ConfigError, coerce_value, unknown_key

S = TypeVar("S")


def setting_names(settings: type) -> list[str]:
    """The ``strategy-options`` keys of a settings class (its fields, in kebab-case)."""
    return [f.name.replace("_", "-") for f in dataclasses.fields(settings)]


def parse_settings(settings: type[S], options: Mapping[str, Any], strategy: str) -> S:
    """``options`` (kebab-case keys, string or typed values) as an instance of ``settings``.

    Raises :class:`~fedlora.config.ConfigError` naming the key for an unknown key, a
    value of the wrong type, or a value the settings' own ``__post_init__`` rejects.
    """
    if not dataclasses.is_dataclass(settings):
        raise TypeError(f"{settings!r} is not a dataclass")
    known = {f.name: f for f in dataclasses.fields(settings)}
    try:  # resolves string annotations (``from __future__ import annotations``) to types
        hints = typing.get_type_hints(settings)
    except (NameError, TypeError):
        hints = {}
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in known and not known:
            raise ConfigError(
                f"Unknown strategy-options key '{key}' (value {value!r}): strategy "
                f"'{strategy}' takes no options"
            )
        if name not in known:
            raise ConfigError(
                unknown_key(f"strategy-options ({strategy})", key, value, setting_names(settings))
            )
        kwargs[name] = coerce_value(key, value, hints.get(name, known[name].type))
    try:
        return settings(**kwargs)
    except ValueError as err:
        raise ConfigError(f"strategy-options ({strategy}): {err}") from None
