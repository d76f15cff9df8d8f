"""Parsing and checking config values: one set of rules, used by every config class."""

from __future__ import annotations

import difflib
import math
import typing
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A run or node configuration value is invalid; the message names key and value."""


def unknown_key(kind: str, key: str, value: Any, known: Iterable[str]) -> str:
    """The message for an unknown key: the closest known ones, or (none close) all of them."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=2, cutoff=0.7)
    hint = (
        f"did you mean {' or '.join(repr(k) for k in close)}?"
        if close
        else f"known keys: {', '.join(known)}"
    )
    return f"Unknown {kind} key '{key}' (value {value!r}); {hint}"


def offline_hint(value: str, remedy: str) -> str:
    """Why a hub id ``value`` could not load, when the Hub is switched off ('' otherwise)."""
    import os
    from pathlib import Path

    if Path(value).expanduser().exists() or os.environ.get("HF_HUB_OFFLINE") != "1":
        return ""
    return (
        f"; it is not a local folder and the Hugging Face Hub is offline (HF_HUB_OFFLINE=1): "
        f"{remedy}"
    )


def fail(key: str, value: Any, why: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` and ``value``."""
    raise ConfigError(f"Invalid value for '{key}': {value!r} {why}")


def positive(cfg: Any, *names: str) -> None:
    """Every named field of ``cfg`` is > 0 (NaN is not)."""
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            fail(name.replace("_", "-"), value, "must be > 0")


def non_negative(cfg: Any, *names: str) -> None:
    """Every named field of ``cfg`` is >= 0."""
    for name in names:
        value = getattr(cfg, name)
        if value < 0:
            fail(name.replace("_", "-"), value, "must be >= 0")


def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """``value`` is one of ``allowed``."""
    if value not in allowed:
        fail(key, value, f"must be one of {', '.join(allowed)}")


def type_name_of(annotation: Any) -> str:
    """A field annotation as the names :func:`coerce_value` reads (``"int"``, ``"float | None"``).

    Dataclass fields carry a string under ``from __future__ import annotations`` and a type
    object otherwise (``int``, ``int | None``, ``Optional[int]``); both come out the same.
    """
    if isinstance(annotation, str):
        return annotation
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return f"{type_name_of(rest[0])} | None"
    return getattr(annotation, "__name__", str(annotation))


def coerce_value(key: str, value: Any, type_name: Any) -> Any:
    """Convert a TOML/CLI value to the field's type, or fail naming the key.

    ``type_name`` is the field's annotation, as a string or a type (see :func:`type_name_of`).
    """
    type_name = type_name_of(type_name)
    if type_name.endswith(" | None"):
        if value is None or str(value).strip().lower() in ("", "none"):
            return None
        type_name = type_name.removesuffix(" | None")
    try:
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if type_name == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if type_name == "float":
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        else:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"Invalid value for '{key}': {value!r} is not a valid {type_name}"
        ) from None
    if not math.isfinite(number):
        raise ConfigError(f"Invalid value for '{key}': {value!r} must be a finite number")
    return number


WEIGHTINGS = ("num-examples", "uniform")


def check_weighting(weighting: str, max_share: float, max_claim_ratio: float) -> None:
    """The rules for how claims become weights (the run config and the server's policy)."""
    one_of("weighting", weighting, WEIGHTINGS)
    if not 0.0 < max_share <= 1.0:
        fail("max-weight-share", max_share, "must be in (0, 1]")
    if max_claim_ratio != 0 and not max_claim_ratio >= 1.0:
        fail("max-claim-ratio", max_claim_ratio, "must be 0 (off) or >= 1")
