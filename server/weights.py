"""Client weights p_k from the example counts nodes claim, bounded against lying nodes.

A node's ``num-examples`` is its own claim; weighted FedAvg trusts it, so one node that
claims 10^9 examples owns the average. Three bounds, applied in this order, keep an
honest federation's weights as they are and cap a liar's:

1. **declared**: a node may not claim more than it declared when it first described
   itself to the server (an honest node's training split does not grow);
2. **ratio**: a claim above ``max_claim_ratio`` times the median of the round's *other*
   claims is cut to that bound (the median of the others, so the liar cannot move it);
3. **share**: no node's weight exceeds ``max_share`` (renormalised by water-filling, so
   the others keep their proportions); with K replies the cap is at least 1/K, so with
   the default 0.5 two replies weigh 0.5 each whatever they claim (set ``max-weight-share``
   to 1 for plain example weighting in a two-node federation you trust).

Bounds 1 and 2 are anomalies, logged and recorded with the round; bound 3 is a policy and
is visible in each node's recorded weight. All pure functions: the math is testable
without Flower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedlora.config.values import check_weighting


@dataclass(frozen=True)
class WeightPolicy:
    """How claims become weights.

    Parameters
    ----------
    weighting : str (default: "num-examples")
        ``"num-examples"`` for p_k proportional to the (bounded) claims, ``"uniform"`` for 1/K.
    max_share : float (default: 0.5)
        Largest weight one node may have, in (0, 1]; 1 turns the cap off.
    max_claim_ratio : float (default: 10.0)
        A claim above this multiple of the median of the others is cut to it; 0 turns
        the bound off.

    """

    weighting: str = "num-examples"
    max_share: float = 0.5
    max_claim_ratio: float = 10.0

    def __post_init__(self) -> None:
        check_weighting(self.weighting, self.max_share, self.max_claim_ratio)


@dataclass(frozen=True)
class Claim:
    """One reply's claim: the examples it says it trained on, and what its node declared."""

    node_id: int
    claimed: int
    declared: int | None = None


@dataclass(frozen=True)
class Anomaly:
    """A claim the server did not take at face value."""

    node_id: int
    claimed: int
    used: float
    reason: str


def bounded_counts(claims: Sequence[Claim], ratio: float) -> tuple[np.ndarray, list[Anomaly]]:
    """The example counts after the declared and ratio bounds, and what was cut and why."""
    counts = np.array([float(c.claimed) for c in claims])
    anomalies: list[Anomaly] = []
    for i, c in enumerate(claims):
        if c.declared is not None and c.declared > 0 and counts[i] > c.declared:
            counts[i] = float(c.declared)
            anomalies.append(
                Anomaly(
                    c.node_id,
                    c.claimed,
                    counts[i],
                    f"claims {c.claimed} examples, declared {c.declared} when it joined",
                )
            )
    if ratio > 0 and len(claims) >= 2:
        limits = [ratio * float(np.median(np.delete(counts, i))) for i in range(len(claims))]
        for i, c in enumerate(claims):
            if counts[i] > limits[i]:
                anomalies.append(
                    Anomaly(
                        c.node_id,
                        c.claimed,
                        limits[i],
                        f"claims {int(counts[i])} examples, over {ratio:g}x the median of "
                        f"the round's other claims ({limits[i] / ratio:g})",
                    )
                )
                counts[i] = limits[i]
    return counts, anomalies


def cap_shares(weights: np.ndarray, cap: float) -> np.ndarray:
    """Weights summing to 1 with none above ``max(cap, 1/K)``, the rest in proportion.

    Water-filling: the nodes over the cap are set to it and the remaining mass is shared
    among the others in their proportions, until none is over.
    """
    w = np.asarray(weights, dtype=np.float64)
    k = len(w)
    if k == 0:
        return w
    cap = max(cap, 1.0 / k)
    capped = np.zeros(k, dtype=bool)
    for _ in range(k):
        free = ~capped
        rest = 1.0 - cap * capped.sum()
        mass = w[free].sum()
        out = np.where(capped, cap, w * (rest / mass if mass > 0 else 0.0))
        if mass <= 0:
            out[free] = rest / free.sum()
        over = free & (out > cap * (1 + 1e-12))
        if not over.any():
            return out
        capped |= over
    return np.full(k, 1.0 / k)


def client_weights(
    claims: Sequence[Claim], policy: WeightPolicy
) -> tuple[np.ndarray | None, list[Anomaly]]:
    """The weights p_k of a round's valid replies (None if every claim is zero).

    Anomalies are returned with uniform weighting too: a lying claim is worth knowing
    about even when it does not move the average.
    """
    if not claims:
        return None, []
    counts, anomalies = bounded_counts(claims, policy.max_claim_ratio)
    raw = np.ones(len(claims)) if policy.weighting == "uniform" else counts
    total = raw.sum()
    if total <= 0:
        return None, anomalies
    return cap_shares(raw / total, policy.max_share), anomalies
