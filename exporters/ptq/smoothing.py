"""SmoothQuant-style smoothing (Xiao et al., 2023): move activation outliers into the weights.

A linear layer computes X @ W = (X / s) @ (s W) for any positive per-input-channel s. With
`s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)` the outlier channels of X (LayerNorm
outputs and GELU outputs of BERT-family models have a few channels ten times larger than
the rest) are divided down before the per-tensor activation quantizer sees them, and the
weight rows they meet are multiplied up, where per-channel weight scales absorb them.

In the integer graph the division is folded into the requantization that produces the
layer's 8-bit input (one multiplier per channel instead of one per tensor: the same op,
other constants) and the multiplication into the quantized weights: nothing is added at
run time, and the integer graph only sees integers. Layers sharing an input (Q, K, V)
share one s, taken over all their weights.

`alpha` is chosen per input from ALPHAS, or no smoothing at all, by the relative output
error of the quantized layers on a sample of calibration rows (`choose`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHAS = (0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
FLOOR = 1e-5  # no factor below this fraction of the largest: a dead channel stays representable


@dataclass(frozen=True)
class Smoothing:
    factors: np.ndarray  # s, one per input channel: the layer takes X / s and s * W
    alpha: float | None  # None: no smoothing (s = 1)
    error: float  # relative output error on the calibration sample


def factors_for(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """SmoothQuant's s for one input shared by `weights` ([in, out] each)."""
    w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    act = np.maximum(act_absmax, FLOOR * max(float(act_absmax.max(initial=0)), 1e-30))
    wmax = np.maximum(w_absmax, FLOOR * max(float(w_absmax.max(initial=0)), 1e-30))
    s = act ** alpha / wmax ** (1 - alpha)
    s = s / np.exp(np.mean(np.log(s)))  # geometric mean 1: the grids stay near where they were
    return np.maximum(s, FLOOR * s.max())


def output_error(sample: np.ndarray, weights: list[np.ndarray], factors: np.ndarray, quantize_act, quantize_ws) -> float:
    """sum ||X W - Qa(X / s) Qw(s W)||^2 / sum ||X W||^2 over the layers sharing X."""
    xq = quantize_act(sample / factors)
    num = den = 0.0
    for w, quantize_w in zip(weights, quantize_ws):
        ref = sample @ w
        got = xq @ quantize_w(w * factors[:, None])
        num += float(np.sum((ref - got) ** 2))
        den += float(np.sum(ref ** 2))
    return num / max(den, 1e-300)


def choose(act_absmax: np.ndarray, sample: np.ndarray, weights: list[np.ndarray], quantize_act, quantize_ws,
           alphas=ALPHAS) -> Smoothing:
    """The smoothing (or none) with the smallest output error on `sample`.

    `quantize_act(x)` fake-quantizes activations as the export will (its clip chosen on x
    itself), `quantize_ws[i](w)` fake-quantizes weight matrix i as its layer will.
    """
    ones = np.ones(sample.shape[1])
    best = Smoothing(ones, None, output_error(sample, weights, ones, quantize_act, quantize_ws))
    for alpha in alphas:
        s = factors_for(act_absmax, weights, alpha)
        err = output_error(sample, weights, s, quantize_act, quantize_ws)
        if err < best.error:
            best = Smoothing(s, alpha, err)
    return best
