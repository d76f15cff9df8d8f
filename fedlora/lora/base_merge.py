"""Merging low-rank stacks into a node's base weights (FLoRA; any strategy that writes the base).

Server and nodes both merge with these functions, in round order, so their merged
bases agree bit for bit; a node reports a fingerprint of its base so the server can
tell when one drifted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from fedlora.lora.lowrank import merge_product
from fedlora.lora.state import AdapterError, AdapterState, state_from_dict

MERGE_PREFIX = "merge/"
"""Payload keys of the stacks a node merges: ``merge/<round>/<peft key>``."""


def merge_into_base(
    delta: Mapping[str, np.ndarray] | None, stack: AdapterState
) -> dict[str, np.ndarray]:
    """The base delta after merging ``stack`` (s B A per module) into ``delta``.

    Server and clients both merge FLoRA stacks with this function, in round order, so
    their merged bases agree bit for bit.
    """
    out = dict(delta or {})
    for module, f in stack.factors.items():
        out[module] = merge_product(out.get(module), stack.scaling, f.b, f.a)
    return out


def merge_received_stacks(
    base: Mapping[str, np.ndarray],
    last_merged: int,
    received: Mapping[str, np.ndarray],
    rounds: Iterable[int],
    scaling_of_rank: Callable[[int], float],
) -> tuple[dict[str, np.ndarray], int]:
    """Merge the stacks ``received`` under ``merge/<round>/`` keys into ``base``, in order.

    Rounds at or before ``last_merged`` are already in the base and skipped. Returns the
    new base and the last round merged. This is the client half of FLoRA's catch-up.
    """
    out, last = dict(base), last_merged
    for r in rounds:
        if r <= last:
            continue
        prefix = f"{MERGE_PREFIX}{r}/"
        stack = state_from_dict(
            {k[len(prefix) :]: v for k, v in received.items() if k.startswith(prefix)}, 1.0
        )
        if not stack.factors:
            raise AdapterError(f"Stack of round {r} is missing from the payload")
        stack = AdapterState(stack.factors, {}, scaling_of_rank(stack.rank))
        out, last = merge_into_base(out, stack), r
    return out, last
