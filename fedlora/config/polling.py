"""How often the ServerApp and the SuperNodes poll, when not at Flower's 3 s.

flwr 1.39 polls every 3 s in two places no setting reaches: the deployment grid's
``send_and_receive`` (the ServerApp waiting for replies) and an idle SuperNode's pull
for its next message: each round's messages wait 1.5 s on average in each direction
(docs/benchmarks.md, section 6, measures both settings side by side). fedlora polls
sooner in both; these environment variables set the intervals, and 3 gives Flower's own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from fedlora.config.values import ConfigError

REPLY_POLL_ENV = "FEDLORA_REPLY_POLL"
"""Seconds between the ServerApp's pulls for replies still missing (default 0.2)."""
IDLE_PULL_ENV = "FEDLORA_SUPERNODE_IDLE_PULL"
"""Seconds between an idle ``fedlora-supernode``'s pulls for a message (default 0.5)."""
DEFAULTS = {REPLY_POLL_ENV: 0.2, IDLE_PULL_ENV: 0.5}
LIMITS = (0.05, 60.0)


def poll_seconds(name: str, environ: Mapping[str, str] = os.environ) -> float:
    """The interval ``name`` sets in ``environ``, validated, or its default."""
    raw = environ.get(name)
    if raw is None:
        return DEFAULTS[name]
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    low, high = LIMITS
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(
            f"Invalid value for {name}: {raw!r}; expected seconds from {low} to {high}"
        )
    return value


def check_polling(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a bad interval before any process starts (``local_federation`` calls it)."""
    for name in DEFAULTS:
        poll_seconds(name, environ)
