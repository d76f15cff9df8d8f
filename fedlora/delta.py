"""Frobenius norms of sums of low-rank products, without forming d_out x d_in matrices.

For dW = sum_i c_i B_i A_i, stack B = [c_1 B_1, c_2 B_2, ...] (d_out x R) and
A = [A_1; A_2; ...] (R x d_in); then ||dW||_F^2 = trace((B^T B)(A A^T)), two R x R
Gram matrices. This is how every strategy's aggregation error is measured each round.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LowRankTerm = tuple[float, np.ndarray, np.ndarray]
"""(coefficient c, B of shape (d_out, r), A of shape (r, d_in)) for the term c * B @ A."""


def sum_sq_norm(terms: Sequence[LowRankTerm]) -> float:
    """||sum_i c_i B_i A_i||_F^2, computed from R x R Gram matrices in float64."""
    terms = [t for t in terms if t[0] != 0.0 and t[1].shape[1] > 0]
    if not terms:
        return 0.0
    b = np.concatenate([c * np.asarray(b, np.float64) for c, b, _ in terms], axis=1)
    a = np.concatenate([np.asarray(a, np.float64) for _, _, a in terms], axis=0)
    value = float(np.sum((b.T @ b) * (a @ a.T)))
    return max(value, 0.0)


def relative_error(
    target: Sequence[Sequence[LowRankTerm]], approx: Sequence[Sequence[LowRankTerm]]
) -> float:
    """||target - approx||_F / ||target||_F summed over modules (one term list per module).

    Returns 0.0 when the target is zero (nothing to approximate).
    """
    num = 0.0
    den = 0.0
    for t_terms, a_terms in zip(target, approx, strict=True):
        diff = list(t_terms) + [(-c, b, a) for c, b, a in a_terms]
        num += sum_sq_norm(diff)
        den += sum_sq_norm(t_terms)
    if den <= 0.0:
        return 0.0
    return float(np.sqrt(num / den))
