"""Canonical correlation analysis of two sets of activations, and the two similarity scores
built on it that measure how much a quantized layer changes a representation.

Both views are (samples, neurons) matrices of the same samples: the float model's
activations and the quantized model's. Canonical correlation analysis (Hotelling 1936)
finds directions a_i, b_i such that the projections x a_i and y b_i are maximally
correlated and uncorrelated with earlier pairs; their correlations rho_1 >= rho_2 >= ... are
the canonical correlations. They are the singular values of Qx^T Qy, where Qx and Qy are
orthonormal bases of the centred views' column spaces, which is how `canonical_correlations`
computes them (no matrix inversion, so rank-deficient views are fine). CCA is invariant to
any invertible linear map of either view: a rotated or rescaled copy has similarity 1.

- SVCCA (Raghu, Gilmer, Yosinski and Sohl-Dickstein, "SVCCA: Singular Vector Canonical
  Correlation Analysis for Deep Learning Dynamics and Interpretability", NeurIPS 2017):
  keep each view's top-k singular directions (the ones carrying the signal; k given, or as
  many as explain 99% of the variance), then the mean canonical correlation.
- PWCCA (Morcos, Raghu and Bengio, "Insights on representational similarity in neural
  networks with canonical correlation", NeurIPS 2018): the canonical correlations weighted
  by how much of the first view each canonical variate accounts for,
  alpha_i = sum_j |<h_i, x_j>| (h_i the i-th canonical variate of x, unit norm; x_j the
  centred neurons), normalised to sum 1. Directions that carry little of the
  representation count little, so noise directions do not pull the score down.

With as many neurons as samples, any two views are perfectly correlated by chance; both
scores therefore keep at most `samples // SAMPLES_PER_DIRECTION` directions per view, so
independent views score near 0 rather than near 1.
"""

from __future__ import annotations

import numpy as np

VARIANCE_KEPT = 0.99
SAMPLES_PER_DIRECTION = 10
_RELATIVE_RANK_TOL = 1e-7  # singular values below this (relative) are rounding noise of x^T x


def _centred(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"CCA takes (samples, neurons) matrices, got shape {x.shape}")
    return x - x.mean(axis=0, keepdims=True)


class View:
    """One centred view and its singular directions, computed once (a float reference is
    compared with many quantized variants)."""

    def __init__(self, x: np.ndarray):
        self.x = _centred(x)
        # The singular directions from the eigenvectors of the small Gram matrix x^T x
        # (u = x v / s): the same directions as an SVD of the tall matrix, many times faster.
        eigenvalues, v = np.linalg.eigh(self.x.T @ self.x)
        order = np.argsort(eigenvalues)[::-1]
        self.s = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
        self._v = v[:, order]
        self.samples = self.x.shape[0]

    def basis(self, keep: int | None = None, variance: float | None = None) -> np.ndarray:
        """Orthonormal basis (samples, r) of the top singular directions: at most `keep`,
        as many as explain `variance` of the variance, never more than samples // 10."""
        s = self.s
        if s.size == 0 or s[0] == 0:
            return np.zeros((self.samples, 0))
        rank = int(np.sum(s > s[0] * _RELATIVE_RANK_TOL))
        if variance is not None:
            energy = np.cumsum(s[:rank] ** 2) / np.sum(s[:rank] ** 2)
            rank = min(rank, int(np.searchsorted(energy, variance - 1e-12)) + 1)
        limit = max(1, self.samples // SAMPLES_PER_DIRECTION)
        rank = min(rank, limit if keep is None else min(keep, limit))
        return (self.x @ self._v[:, :rank]) / s[:rank]

    @property
    def constant(self) -> bool:
        return not np.any(self.x)


def _view(x) -> View:
    return x if isinstance(x, View) else View(x)


def canonical_correlations(x, y, keep: int | None = None, variance: float | None = None):
    """(rho, hx): canonical correlations in decreasing order, and the canonical variates
    of x (samples, len(rho)), unit norm, after reducing each view to its top singular
    directions (`keep`, `variance`, and never more than samples // 10). x and y are
    (samples, neurons) arrays or `View`s."""
    x, y = _view(x), _view(y)
    if x.samples != y.samples:
        raise ValueError(f"the views have {x.samples} and {y.samples} samples")
    qx, qy = x.basis(keep, variance), y.basis(keep, variance)
    if qx.shape[1] == 0 or qy.shape[1] == 0:
        return np.zeros(0), qx
    a, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    return np.clip(rho, 0.0, 1.0), qx @ a


def svcca(x, y, topk: int | None = None) -> float:
    """SVCCA similarity (Raghu et al. 2017): mean canonical correlation of the two views'
    top-`topk` singular directions (default: those explaining 99% of the variance)."""
    x, y = _view(x), _view(y)
    rho, _ = canonical_correlations(x, y, keep=topk, variance=None if topk else VARIANCE_KEPT)
    return _degenerate(x, y) if rho.size == 0 else float(np.mean(rho))


def pwcca(x, y) -> float:
    """PWCCA similarity (Morcos et al. 2018) of view y to view x: canonical correlations
    weighted by each canonical variate's share of x's neurons."""
    x, y = _view(x), _view(y)
    rho, hx = canonical_correlations(x, y, variance=VARIANCE_KEPT)
    if rho.size == 0:
        return _degenerate(x, y)
    weights = np.sum(np.abs(hx.T @ x.x), axis=1)
    if weights.sum() == 0:
        return float(np.mean(rho))
    return float(np.sum(weights * rho) / np.sum(weights))


def _degenerate(x: View, y: View) -> float:
    """A constant view: similar only to another constant view."""
    return 1.0 if x.constant and y.constant else 0.0
