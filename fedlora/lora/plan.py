"""What a node is asked to do in one round, and what that means on both ends."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.lora.seeded import seeded_a
from fedlora.lora.state import A_SUFFIX, B_SUFFIX


def start_tensors(
    fresh: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    *,
    rank: int,
    reinit: bool,
    a_from_seed: bool,
    init_seed: int,
) -> dict[str, np.ndarray]:
    """The adapter a client starts its round from (the client-side half of a ClientPlan).

    ``fresh`` is the model's own initialisation. Received factors replace it unless
    ``reinit`` (then B = 0 and A stays fresh); lora_A is the shared seeded draw when
    ``a_from_seed``; received dense tensors (the head) always load.
    """
    start = {k: np.asarray(v) for k, v in fresh.items()}
    for key, value in received.items():
        if not key.endswith((A_SUFFIX, B_SUFFIX)) or not reinit:
            start[key] = np.asarray(value)
    for key, value in start.items():
        if reinit and key.endswith(B_SUFFIX):
            start[key] = np.zeros_like(value)
        if a_from_seed and key.endswith(A_SUFFIX):
            start[key] = seeded_a(key[: -len(A_SUFFIX)], rank, value.shape[1], init_seed)
    return start
