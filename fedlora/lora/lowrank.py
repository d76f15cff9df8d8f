"""Frobenius norms of sums of low-rank products, without forming d_out x d_in matrices.

For dW = sum_i c_i B_i A_i, stack B = [c_1 B_1, c_2 B_2, ...] (d_out x R) and
A = [A_1; A_2; ...] (R x d_in); then ||dW||_F^2 = trace((B^T B)(A A^T)), two R x R
Gram matrices. This is how every strategy's aggregation error is measured each round.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

LowRankTerm = tuple[float, np.ndarray, np.ndarray]
"""(coefficient c, B of shape (d_out, r), A of shape (r, d_in)) for the term c * B @ A."""


def sum_sq_norm(terms: Sequence[LowRankTerm]) -> float:
    """||sum_i c_i B_i A_i||_F^2, computed from R x R Gram matrices in float64."""
    terms = [t for t in terms if t[0] != 0.0 and t[1].shape[1] > 0]
    if not terms:
        return 0.0
    b, a = _stack(terms)
    value = float(np.sum((b.T @ b) * (a @ a.T)))
    return max(value, 0.0)


def _stack(terms: Sequence[LowRankTerm]) -> tuple[np.ndarray, np.ndarray]:
    """[c_1 B_1, c_2 B_2, ...] and [A_1; A_2; ...] in float64."""
    b = np.concatenate([c * np.asarray(b, np.float64) for c, b, _ in terms], axis=1)
    a = np.concatenate([np.asarray(a, np.float64) for _, _, a in terms], axis=0)
    return b, a


class ProductSum:
    """T = sum_i c_i B_i A_i, held as stacked factors, with ||T||_F^2 computed once.

    Measuring many candidates S against one T (LoRA-FAIR's before/after, FedAvg's error,
    the row-space floor) then costs R x r products each instead of a new R x R Gram:
    ||T - S||^2 = ||T||^2 - 2 <T, S> + ||S||^2.
    """

    def __init__(self, terms: Sequence[LowRankTerm]) -> None:
        terms = [t for t in terms if t[0] != 0.0 and t[1].shape[1] > 0]
        if terms:
            self.b, self.a = _stack(terms)
        else:
            self.b = np.zeros((0, 0))
            self.a = np.zeros((0, 0))
        self.sq_norm = max(float(np.sum((self.b.T @ self.b) * (self.a @ self.a.T))), 0.0)

    def times_at(self, a: np.ndarray) -> np.ndarray:
        """T @ a^T (d_out x r) without forming T."""
        if self.b.size == 0:
            return np.zeros((0, a.shape[0]))
        return self.b @ (self.a @ np.asarray(a, np.float64).T)

    def inner(self, terms: Sequence[LowRankTerm]) -> float:
        """<T, sum_j c_j B_j A_j>_F."""
        terms = [t for t in terms if t[0] != 0.0 and t[1].shape[1] > 0]
        if not terms or self.b.size == 0:
            return 0.0
        b, a = _stack(terms)
        return float(np.sum((self.b.T @ b) * (self.a @ a.T)))

    def distance_sq(self, terms: Sequence[LowRankTerm]) -> float:
        """||T - sum_j c_j B_j A_j||_F^2."""
        value = self.sq_norm - 2.0 * self.inner(terms) + sum_sq_norm(terms)
        return max(value, 0.0)

    def outside_rows_sq(self, a: np.ndarray) -> float:
        """||T (I - P)||_F^2, P the projector onto the row space of ``a`` (Pythagoras)."""
        a = np.asarray(a, np.float64)
        m = self.times_at(a)
        inside = float(np.trace(m.T @ m @ np.linalg.pinv(a @ a.T))) if m.size else 0.0
        return max(self.sq_norm - inside, 0.0)


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


def merge_product(
    delta: np.ndarray | None, scaling: float, b: np.ndarray, a: np.ndarray
) -> np.ndarray:
    """Return delta + scaling * b @ a, computed in float64 and cast to float32.

    Server and clients merge FLoRA stacks with this one function, in the same order, so
    their merged bases agree bit for bit.
    """
    product = scaling * (np.asarray(b, np.float64) @ np.asarray(a, np.float64))
    if delta is not None:
        product += np.asarray(delta, np.float64)
    return product.astype(np.float32)


def fingerprint(delta: Mapping[str, np.ndarray], probes: int = 4) -> list[float]:
    """A few seeded bilinear probes u^T D v summed over modules: a cheap summary of a base.

    Two bases that agree give the same numbers; bases that differ almost surely do not.
    """
    out = np.zeros(probes, dtype=np.float64)
    for module in sorted(delta):
        d = np.asarray(delta[module], np.float64)
        rng = np.random.default_rng(zlib.crc32(module.encode("utf-8")))
        u = rng.standard_normal((probes, d.shape[0]))
        v = rng.standard_normal((probes, d.shape[1]))
        out += np.einsum("pi,ij,pj->p", u, d, v)
    return [float(x) for x in out]


def truncated_svd(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Best rank-``rank`` factors (B, A) with B @ A ~ ``delta``, and the truncation error.

    The error is relative, in Frobenius norm (Eckart-Young: the discarded singular values).
    """
    d = np.asarray(delta, np.float64)
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    b = (u[:, :k] * root).astype(np.float32)
    a = (root[:, None] * vt[:k]).astype(np.float32)
    total = float(np.sum(s**2))
    error = float(np.sqrt(np.sum(s[k:] ** 2) / total)) if total > 0 else 0.0
    if k < rank:  # pad to the asked rank so the adapter has the configured shape
        b = np.pad(b, ((0, 0), (0, rank - k)))
        a = np.pad(a, ((0, rank - k), (0, 0)))
    return b, a, error


def lowrank_svd(terms: Sequence[LowRankTerm], rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`truncated_svd` of sum_i c_i B_i A_i, without forming the d_out x d_in matrix.

    With the stacks B (d_out x R) and A (R x d_in), B = Q_b R_b and A^T = Q_a R_a (thin QR),
    so sum = Q_b (R_b R_a^T) Q_a^T and the SVD of the R x R core gives the factors:
    O((d_out + d_in) R^2) instead of O(d_out d_in min(d_out, d_in)).
    """
    terms = [t for t in terms if t[0] != 0.0 and t[1].shape[1] > 0]
    d_out = terms[0][1].shape[0] if terms else 0
    d_in = terms[0][2].shape[1] if terms else 0
    if not terms:
        raise ValueError("lowrank_svd needs at least one non-zero term")
    b, a = _stack(terms)
    q_b, r_b = np.linalg.qr(b)
    q_a, r_a = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(r_b @ r_a.T)
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    b_out = ((q_b @ u[:, :k]) * root).astype(np.float32)
    a_out = (root[:, None] * (vt[:k] @ q_a.T)).astype(np.float32)
    total = float(np.sum(s**2))
    error = float(np.sqrt(np.sum(s[k:] ** 2) / total)) if total > 0 else 0.0
    if k < rank:
        b_out = np.pad(b_out, ((0, 0), (0, rank - k)))
        a_out = np.pad(a_out, ((0, rank - k), (0, 0)))
    assert b_out.shape == (d_out, rank) and a_out.shape == (rank, d_in)
    return b_out, a_out, error


def procrustes_rotation(a: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The orthogonal r x r matrix R that minimises ||R a - reference||_F.

    Orthogonal Procrustes (Schönemann 1966): with U S V^T = svd(reference a^T), R = U V^T.
    Rotating a node's factors by it (A <- R A, B <- B R^T) leaves B A unchanged and brings
    its A as close as a rotation can to the reference (FedRot-LoRA's alignment).
    """
    u, _, vt = np.linalg.svd(np.asarray(reference, np.float64) @ np.asarray(a, np.float64).T)
    return u @ vt
