"""GPTQ weight rounding (Frantar et al., 2023): round one input row of W at a time and
spread its rounding error over the rows not yet rounded, weighted by the calibration
Hessian, so that the layer's output X @ W moves as little as possible.

For a linear layer y = X @ W (W: [in, out], as ONNX MatMul holds it) the output error of
a quantized Wq is tr((W - Wq)^T H (W - Wq)) with H = X^T X over the calibration rows.
GPTQ rounds row i to the grid, then updates the remaining rows j > i by
`W[j] -= Hinv[i, j] / Hinv[i, i] * (W[i] - Wq[i])`, where Hinv is the upper Cholesky
factor of H^-1 (the order of the rows: largest diag(H) first, "act order"). The grid (one
scale per output channel or per tensor, and the integer range: 2..8, 16 bits or ternary)
is fixed beforehand by the ordinary weight quantizer, so GPTQ only changes which grid
point each weight rounds to. `damp` adds that fraction of mean(diag(H)) to the diagonal,
as the paper does, so that a rank-deficient H stays invertible.
"""

from __future__ import annotations

import numpy as np

BLOCK = 128  # rows updated lazily together (the paper's block size): same result, faster


def gptq_round(w: np.ndarray, scale: np.ndarray, lo: int, hi: int, hessian: np.ndarray,
               damp: float = 0.01) -> np.ndarray:
    """Integers q (shape of w, in [lo, hi]) with w ~ q * scale, chosen by GPTQ.

    `scale`: one per output column (shape [out]) or a scalar; `hessian`: [in, in].
    """
    w = np.array(w, np.float64)
    rows, cols = w.shape
    scale = np.broadcast_to(np.asarray(scale, np.float64), (cols,))
    h = np.array(hessian, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[order], h[np.ix_(order, order)]
    h[np.diag_indices(rows)] += damp * float(np.mean(np.diag(h)))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        h[np.diag_indices(rows)] += float(np.mean(np.diag(h)))  # far from positive definite: damp hard
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros((rows, cols), np.int64)
    for start in range(0, rows, BLOCK):
        stop = min(start + BLOCK, rows)
        block = w[start:stop].copy()
        errors = np.zeros_like(block)
        u = upper[start:stop, start:stop]
        for i in range(stop - start):
            row = block[i]
            qi = np.clip(np.rint(row / scale), lo, hi)
            q[start + i] = qi.astype(np.int64)
            err = (row - qi * scale) / u[i, i]
            block[i:] -= np.outer(u[i, i:], err)
            errors[i] = err
        w[stop:] -= upper[start:stop, stop:].T @ errors
    out = np.empty_like(q)
    out[order] = q
    return out
