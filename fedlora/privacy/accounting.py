"""Epsilon of central (user-level) DP: Flower's fixed-clipping mechanism, accounted by Opacus."""

from __future__ import annotations

import math

from opacus.accountants import create_accountant


def central_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon, at ``delta``, of ``releases`` rounds of Flower's central-DP mechanism.

    A round releases the mean of m updates, each clipped to C, plus N(0, (z C / m)^2): the
    Gaussian mechanism with multiplier z on one node's contribution (add/remove
    adjacency, as Flower's wrappers). No amplification by sampling is claimed: the server
    samples with a generator seeded from the run configuration, so who took part is not
    secret. Hence sample rate 1 in Opacus's RDP accountant.
    """
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = create_accountant("rdp")
    accountant.history = [(noise_multiplier, 1.0, releases)]
    return float(accountant.get_epsilon(delta))
