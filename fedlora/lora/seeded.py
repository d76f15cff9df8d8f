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


def seeded_orthonormal(name: str, rank: int, dim: int, seed: int) -> np.ndarray:
    """A seeded ``rank x dim`` matrix with orthonormal rows (Fed-SB's fixed A, and B^T).

    The thin QR of a Gaussian ``dim x rank`` draw keyed by (seed, ``name``), computed in
    float64 with the signs fixed (diag(R) > 0, which makes the factor unique), then
    rounded once to float32: two machines whose LAPACK round differently in float64 still
    agree in float32 (up to a rare tie). Needs ``rank <= dim``.
    """
    if not 0 < rank <= dim:
        raise ValueError(f"'{name}': an orthonormal basis of rank {rank} needs 0 < rank <= {dim}")
    key = zlib.crc32(name.encode("utf-8"))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, key, 0x5B])  # not seeded_a's stream
    q, r = np.linalg.qr(rng.standard_normal((dim, rank)))
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    return np.ascontiguousarray(q.T).astype(np.float32)
