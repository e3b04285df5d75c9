"""Per-layer choice of clipping (`--calib-method auto`).

Each calibration method gives a tensor a clip value (`calibrate.TensorStats.clip`). The
method that measures best differs from tensor to tensor: min-max keeps the rare outliers a
LayerNorm output needs, MSE and entropy clip the long tail of a GELU output. For the input
of a linear layer the export measures what matters, the layer's output: for every method,
the relative error ||X W - Q(X) W||^2 / ||X W||^2 on the calibration sample, and keeps the
smallest. Tensors that feed no linear layer keep the MSE clip, which is by construction the
best for the tensor's own squared error.
"""

from __future__ import annotations

import numpy as np

METHODS = ("minmax", "percentile", "mse", "entropy")


def fake_quant(x: np.ndarray, clip: float, bits: int) -> np.ndarray:
    """Symmetric `bits`-bit quantization with clip value `clip` (scale clip / (2^(b-1) - 1))."""
    top = (1 << (bits - 1)) - 1
    s = clip / top
    return np.clip(np.rint(x / s), -top - 1, top) * s


def output_error(sample: np.ndarray, weights: list[np.ndarray], clip: float, bits: int) -> float:
    xq = fake_quant(sample, clip, bits)
    num = den = 0.0
    for w in weights:
        ref = sample @ w
        num += float(np.sum((ref - xq @ w) ** 2))
        den += float(np.sum(ref ** 2))
    return num / max(den, 1e-300)


def choose_clip(clips: dict[str, float], sample: np.ndarray, weights: list[np.ndarray], bits: int) -> tuple[str, float]:
    """(method, clip) of the candidate `clips` (method -> clip value) with the smallest
    output error of the layers `weights` on `sample`."""
    scored = [(output_error(sample, weights, c, bits), m, c) for m, c in clips.items()]
    _, method, clip = min(scored)
    return method, clip
