"""Numbers and reasons read from a peer's message: nothing in them is trusted.

A MetricRecord value may be a list, NaN or 1e300; an error reply's reason may be missing
(Flower turns an empty reason into None). These helpers turn each into something the
server can use, or say that it cannot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flwr.app import Message


def whole_number(metrics: Mapping[str, Any], key: str, default: int) -> int | None:
    """``metrics[key]`` as an int (``default`` when absent); None unless a finite whole number."""
    value = metrics.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value != int(value) or abs(value) > 2**53:
        return None
    return int(value)


def finite_number(metrics: Mapping[str, Any], key: str) -> float | None:
    """``metrics[key]`` as a float; None when absent or not a finite number."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def error_reason(msg: Message) -> str:
    """A failed node's reason, never empty."""
    reason = msg.error.reason
    return str(reason) if reason else f"error code {msg.error.code} without a reason"
