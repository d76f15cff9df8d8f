"""``fedlora-supernode``: ``flower-supernode`` that asks for its next message sooner.

An idle flwr 1.39 SuperNode sleeps 3 s between pulls from the SuperLink
(``time.sleep(3)`` in ``flwr/supernode/start_client_internal.py``, with no flag or
variable to change it), so every round's training message waits 1.5 s on average
before a node starts on it (docs/benchmarks.md, section 6). This entry point is
``flower-supernode`` with the same arguments, except in that one module, which holds
the SuperNode's loop:

- its waits are capped at ``FEDLORA_SUPERNODE_IDLE_PULL`` seconds (default 0.5): the
  idle pull, and the wait for the ClientApp's reply (0.5 s already);
- a message whose arrays are still uploading when it is pulled is retried on that
  scale, not after Flower's 1 to 10 s (:mod:`fedlora.wire.object_pulls`).

The cap reaches the module through its own ``time`` name, and only while the module's
waits are the ones read here (3 s and 0.5 s): with a Flower whose loop has changed the
SuperNode runs unchanged, with a warning. At 0.5 s an idle node makes two small
requests a second to the SuperLink; set the variable to 3 for Flower's own rate.
"""

from __future__ import annotations

import inspect
import re
import sys
import time
import types
import warnings

from fedlora.config import ConfigError
from fedlora.config.polling import IDLE_PULL_ENV, poll_seconds
from fedlora.wire.object_pulls import retry_sooner

FLOWER_WAITS = {"3", "0.5"}
"""The arguments of every ``time.sleep`` in flwr 1.39's SuperNode loop module."""


class _CappedTime(types.ModuleType):
    """The ``time`` module as the SuperNode loop sees it: ``sleep`` capped, the rest as is."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self._cap = cap

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap))


def _loop_waits(module: types.ModuleType) -> set[str] | None:
    """The arguments of the module's ``time.sleep`` calls; None when its source is absent."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):  # an install without .py files
        return None
    return set(re.findall(r"\btime\.sleep\(([^()]*)\)", source))


def cap_idle_pull(cap: float) -> bool:
    """Cap the waits of flwr's SuperNode loop at ``cap`` s; False (and a warning) if unknown."""
    from flwr.supernode import start_client_internal as loop

    waits = _loop_waits(loop)
    if waits != FLOWER_WAITS:
        warnings.warn(
            f"fedlora-supernode: this Flower's SuperNode loop waits {sorted(waits or [])}, "
            f"not the {sorted(FLOWER_WAITS)} s this was written for; running it unchanged",
            stacklevel=2,
        )
        return False
    loop.time = _CappedTime(cap)  # type: ignore[attr-defined]
    retry_sooner(loop, first_retry=cap)
    return True


def main() -> None:
    """Run ``flower-supernode`` (same arguments) with the idle pull capped."""
    try:
        cap = poll_seconds(IDLE_PULL_ENV)
    except ConfigError as err:
        raise SystemExit(f"fedlora-supernode: {err}") from None
    cap_idle_pull(cap)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv[0] = "fedlora-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
