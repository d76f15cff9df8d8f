"""Retry a message's not-yet-uploaded contents on the poll's scale, not Flower's 1-10 s.

A Flower message travels as a header and then its objects (the arrays), pushed one after
the other. The SuperLink hands the header out at once, so a receiver that polls often
(fedlora's ServerApp every 0.2 s, an idle ``fedlora-supernode`` every 0.5 s) often gets
it while the objects are still uploading. flwr 1.39's ``pull_objects`` then retries
each missing object after 1, 2, 4 ... up to 10 s, which can cost more than the sooner
poll saved. The warm worker meets the same when it claims a task the moment its
SuperNode has the header (the SuperNode creates the task before pulling the arrays).
:func:`retry_sooner` gives a module's pull functions a first retry of ``first_retry`` s
and a 1 s cap; the overall limit stays Flower's (``PULL_MAX_TIME``).
"""

from __future__ import annotations

import functools
import types

from flwr.supercore.inflatable import inflatable_utils

RETRY_CAP_SECONDS = 1.0
_FLOWER_PULLS = ("pull_objects", "pull_and_inflate_object_from_tree")
"""flwr's two pull functions with a backoff; a module uses them through these names."""


def retry_sooner(module: types.ModuleType, first_retry: float) -> list[str]:
    """Make ``module``'s names of flwr's pull functions retry sooner; return those changed.

    A name is changed only while it still refers to flwr's own function (or to a
    previous :func:`retry_sooner` of it), so calling this twice is harmless.
    """
    changed = []
    for name in _FLOWER_PULLS:
        current = getattr(module, name, None)
        original = getattr(current, "func", current)
        if original is not getattr(inflatable_utils, name):
            continue
        setattr(
            module,
            name,
            functools.partial(
                original,
                initial_backoff=first_retry,
                backoff_cap=max(RETRY_CAP_SECONDS, first_retry),
                max_tries_per_object=None,  # bounded by max_time (PULL_MAX_TIME), as before
            ),
        )
        changed.append(name)
    return changed
