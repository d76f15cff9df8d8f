"""LoRA factors that server and clients regenerate from a shared seed instead of sending.

FFA-LoRA freezes A at a seeded initialisation and never transmits it; heterogeneous
ranks nest: a client of rank r uses the first r rows of the same r_max x d_in matrix.
FLoRA's fresh per-round A_k comes from a seed the server also knows, so a compressed
uplink can send A_k as a delta from it. The draw is peft's default for lora_A
(Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))), but from a
numpy generator keyed by (seed, module name), so it is the same on every machine and
independent of torch's global RNG.
"""

from __future__ import annotations

import zlib

import numpy as np


def seeded_a(module: str, rank: int, d_in: int, seed: int) -> np.ndarray:
    """The first ``rank`` rows of the seeded A for ``module`` (nested across ranks).

    Rows are drawn one at a time from the same stream, so ``seeded_a(m, r, ...)`` is a
    prefix of ``seeded_a(m, r2, ...)`` for every r <= r2.
    """
    key = zlib.crc32(module.encode("utf-8"))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, key])
    bound = 1.0 / np.sqrt(d_in)
    return rng.uniform(-bound, bound, size=(rank, d_in)).astype(np.float32)
