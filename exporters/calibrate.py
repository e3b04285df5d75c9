"""Calibration: the range of every quantized tensor, from the float model run on sample data.

Activations are quantized symmetrically, `q = clip(round(x / s), -2^(b-1), 2^(b-1) - 1)` with
`s = clip / (2^(b-1) - 1)`. The clip value comes from the tensor's observed values:

- `minmax`: the largest |x| seen;
- `percentile LOW HIGH`: the LOW-th and HIGH-th percentiles of x (for example 0.01 and
  99.99); clip = max(-x_LOW, x_HIGH), so the symmetric range covers both;
- `mse`: the clip that minimises the expected squared quantization error of the observed
  distribution, `sum_{|x| > c} (|x| - c)^2 + N_inside * s^2 / 12` (clipping error plus
  uniform rounding noise), searched over 256 candidates up to max |x| for each bit width;
- `entropy`: the clip minimising the KL divergence between the histogram and its
  quantized version (TensorRT's entropy calibrator, `ptq/entropy.py`).

Tensors quantized to 16 bits (residual stream, LayerNorm inputs, outputs) use twice the
largest |x| seen, whatever the method: one bit of headroom for values beyond the
calibration data's, at a resolution still far finer than 8-bit points.

Observers run in two passes over the data: the first records each tensor's largest |x|,
the second a histogram of x over [-max, max] (4096 bins), from which percentiles and the
MSE search are computed. `minmax` needs only the first pass.

Weights: per output channel or per tensor; absmax at 8 bits and above, the MSE-optimal clip
below 8 bits; ternary weights use BitNet b1.58's absmean scale (`s = mean |w|`, q =
clip(round(w / s), -1, 1)).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .config import WEIGHT_BITS, signed_type
from .dyadic import ExportError
from .ptq.entropy import entropy_clip

CALIB_METHODS = ("minmax", "percentile", "mse", "entropy", "auto")
BINS = 4096
MSE_CANDIDATES = 256


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


@dataclass
class TensorStats:
    """What calibration saw of one float tensor."""

    absmax: float = 0.0
    lo: float = float("inf")
    hi: float = float("-inf")
    count: int = 0
    hist: np.ndarray | None = None  # counts over [-absmax, absmax], BINS bins
    # The largest sum of squared deviations from the row mean over any row (the last axis),
    # padding rows included: what an integer LayerNorm on this tensor must hold (its variance).
    row_sumsq: float = 0.0

    def observe_range(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        x = np.asarray(x, np.float64)
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.absmax = max(self.absmax, abs(self.lo), abs(self.hi))
        self.count += x.size

    def observe_rows(self, x: np.ndarray) -> None:
        if x.ndim == 0 or x.size == 0:
            return
        x = np.asarray(x, np.float64)
        d = x - x.mean(axis=-1, keepdims=True)
        self.row_sumsq = max(self.row_sumsq, float(np.max(np.sum(d * d, axis=-1))))

    def observe_histogram(self, x: np.ndarray) -> None:
        if self.hist is None:
            self.hist = np.zeros(BINS, np.int64)
        if self.absmax == 0.0 or x.size == 0:
            return
        counts, _ = np.histogram(np.asarray(x, np.float64), bins=BINS, range=(-self.absmax, self.absmax))
        self.hist += counts

    # --- clip values ---------------------------------------------------------------------

    def clip(self, bits: int, method: str, percentile: tuple[float, float] | None = None) -> float:
        """The largest |x| the quantized tensor represents (its scale is clip / qmax)."""
        if self.absmax == 0.0:
            return 1.0  # an all-zero tensor: any scale represents it exactly
        if bits >= 16:
            # A 16-bit grid has resolution to spare, and the tensors kept at 16 bits (the
            # residual stream) are the ones whose outliers exceed the calibration data's:
            # one bit of headroom.
            return 2 * self.absmax
        if method == "minmax" or self.hist is None:
            return self.absmax
        if method == "percentile":
            low, high = percentile or (0.01, 99.99)
            return max(-self._percentile(low), self._percentile(high), self.absmax * 1e-6)
        if method == "mse":
            return self._mse_clip(bits)
        if method == "entropy":
            return max(entropy_clip(self.hist, self.absmax, bits), self.absmax / MSE_CANDIDATES)
        raise ExportError(f"unknown calibration method {method!r}; choose from {', '.join(CALIB_METHODS)}")

    def _edges(self) -> np.ndarray:
        return np.linspace(-self.absmax, self.absmax, BINS + 1)

    def _percentile(self, q: float) -> float:
        cumulative = np.cumsum(self.hist)
        total = cumulative[-1]
        if total == 0:
            return 0.0
        target = q / 100.0 * total
        index = int(np.searchsorted(cumulative, target, side="left"))
        index = min(index, BINS - 1)
        edges = self._edges()
        before = cumulative[index - 1] if index else 0
        inside = self.hist[index]
        fraction = 0.0 if inside == 0 else (target - before) / inside
        return float(edges[index] + fraction * (edges[index + 1] - edges[index]))

    def _mse_clip(self, bits: int) -> float:
        edges = self._edges()
        centers = np.abs((edges[:-1] + edges[1:]) / 2)
        counts = self.hist.astype(np.float64)
        candidates = np.linspace(self.absmax / MSE_CANDIDATES, self.absmax, MSE_CANDIDATES)
        best, best_err = self.absmax, np.inf
        for c in candidates:
            s = c / qmax(bits)
            outside = centers > c
            err = np.sum(counts[outside] * (centers[outside] - c) ** 2) + np.sum(counts[~outside]) * s * s / 12
            if err < best_err:
                best, best_err = float(c), err
        return best


@dataclass
class Calibration:
    """Statistics of every observed tensor, and the settings that turn them into scales."""

    stats: dict[str, TensorStats] = field(default_factory=dict)
    method: str = "mse"
    percentile: tuple[float, float] | None = None
    inputs: dict[str, "InputStats"] = field(default_factory=dict)  # linear layers' inputs
    clips: dict[tuple[str, int], float] = field(default_factory=dict)  # chosen per layer (ptq.clipping)

    def clip(self, tensor: str, bits: int, method: str | None = None) -> float:
        """The clip value of `tensor` at `bits` bits (by `method`, default: as configured)."""
        if tensor not in self.stats:
            raise ExportError(f"internal: tensor {tensor!r} was not calibrated")
        if method is None and (tensor, bits) in self.clips:
            return self.clips[(tensor, bits)]
        method = method or self.method
        return self.stats[tensor].clip(bits, "mse" if method == "auto" else method, self.percentile)

    def with_method(self, method: str, percentile=None) -> "Calibration":
        """The same observations with another method (and no per-layer clips chosen yet)."""
        if method not in CALIB_METHODS:
            raise ExportError(f"unknown calibration method {method!r}; choose from {', '.join(CALIB_METHODS)}")
        return Calibration(self.stats, method, percentile, self.inputs)

    def scale(self, tensor: str, bits: int) -> float:
        """The scale of `tensor` quantized to `bits` bits."""
        return self.clip(tensor, bits) / qmax(bits)


@dataclass
class InputStats:
    """What calibration saw of a linear layer's input, row by row (the last axis holds the
    channels): each channel's largest |x| and sum, the Gram matrix X^T X (GPTQ's Hessian up
    to a factor), and a uniform sample of rows (to measure a layer's output error)."""

    absmax: np.ndarray | None = None
    total: np.ndarray | None = None
    gram: np.ndarray | None = None
    rows: int = 0
    sample: np.ndarray | None = None
    _kept: int = 0

    def observe(self, rows: np.ndarray, rng: np.random.Generator) -> None:
        x = np.asarray(rows, np.float64).reshape(-1, rows.shape[-1])
        if x.shape[0] == 0:
            return
        if self.absmax is None:
            width = x.shape[1]
            self.absmax, self.total = np.zeros(width), np.zeros(width)
            self.gram = np.zeros((width, width))
            self.sample = np.zeros((SAMPLE_ROWS, width), np.float32)
        self.absmax = np.maximum(self.absmax, np.abs(x).max(axis=0))
        self.total += x.sum(axis=0)
        self.gram += x.T @ x
        # reservoir sampling (Algorithm R): every row seen has the same chance to be kept
        for row in x:
            if self._kept < SAMPLE_ROWS:
                self.sample[self._kept] = row
                self._kept += 1
            else:
                j = int(rng.integers(0, self.rows + 1))
                if j < SAMPLE_ROWS:
                    self.sample[j] = row
            self.rows += 1

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.rows, 1)

    @property
    def rows_sample(self) -> np.ndarray:
        return self.sample[: self._kept].astype(np.float64)


SAMPLE_ROWS = 2048


def calibrate(runner_factory, tensors: list[str], batches, method: str, percentile=None, progress=None,
              padding=None, layer_inputs=(), row_tensors=()) -> Calibration:
    """Run the float model over `batches` (a re-iterable of feed dicts) and observe `tensors`.

    `runner_factory(tensors)` returns a FloatRunner exposing them. `progress(done, total,
    what)` is called after each batch. `padding(feeds)`, for text models, returns the feeds
    with different tokens at the padded positions: an element that changes with them is
    computed from padding only, which the model never uses (the attention mask hides it),
    so it is left out of the statistics; at sequence length 128 most elements are such.
    `layer_inputs` (tensors among `tensors`) also get InputStats, in `Calibration.inputs`;
    `row_tensors` (LayerNorm inputs) their largest row variance, `TensorStats.row_sumsq`.
    """
    if method not in CALIB_METHODS:
        raise ExportError(f"unknown calibration method {method!r}; choose from {', '.join(CALIB_METHODS)}")
    if method == "percentile":
        if percentile is None:
            percentile = (0.01, 99.99)
        low, high = percentile
        if not 0.0 <= low < high <= 100.0:
            raise ExportError(f"--percentile LOW HIGH needs 0 <= LOW < HIGH <= 100, got {low} {high}")
    runner = runner_factory(tensors)
    row_tensors = set(row_tensors)
    result = Calibration({t: TensorStats() for t in tensors}, method, percentile)
    result.inputs = {t: InputStats() for t in layer_inputs}
    rng = np.random.default_rng(0)
    passes = 1 if method == "minmax" else 2
    total = len(batches) * passes
    done = 0
    for pass_index in range(passes):
        for feeds in batches:
            values = runner.run(feeds)
            other = runner.run(padding(feeds)) if padding is not None else None
            for t in tensors:
                a = values[t]
                keep = None
                if other is not None and other[t].shape == a.shape:
                    keep = (a == other[t]) | (np.isnan(a) & np.isnan(other[t]))
                    if not keep.any():
                        keep = None
                if pass_index == 0:
                    result.stats[t].observe_range(a if keep is None else a[keep])
                    if t in row_tensors:
                        result.stats[t].observe_rows(a)
                    if t in result.inputs and a.ndim >= 1:
                        rows = a.reshape(-1, a.shape[-1])
                        if keep is not None:
                            rows = rows[keep.reshape(-1, a.shape[-1]).all(axis=1)]
                        result.inputs[t].observe(rows, rng)
                else:
                    result.stats[t].observe_histogram(a if keep is None else a[keep])
            done += 1
            if progress is not None:
                progress(done, total, "calibrating")
    return result


# --- weights ------------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    q: np.ndarray  # integers
    scale: np.ndarray  # per output channel (1-D) or a 0-d array
    dtype: str  # IR type name

    def dequantized(self) -> np.ndarray:
        return (self.q.astype(np.float64) * self.scale).astype(np.float32)


def weight_range(bits) -> tuple[int, int, str]:
    """(lo, hi, IR type) of `bits`-bit weights: the narrowest type holding them (3-bit
    weights are int4 constants whose values stay in [-4, 3])."""
    if bits == "ternary":
        return -1, 1, "ternary"
    if str(bits) not in WEIGHT_BITS:
        raise ExportError(f"weight bits must be 2..8, 16 or ternary; got {bits!r}")
    dtype, lo, hi = signed_type(int(bits))
    return lo, hi, dtype


def quantize_weight(w: np.ndarray, bits, per_channel: bool, axis: int = -1) -> QuantizedWeight:
    """Symmetric quantization of a weight matrix, per output channel along `axis` or per tensor."""
    w = np.asarray(w, np.float64)
    lo, hi, dtype = weight_range(bits)
    moved = np.moveaxis(w, axis, -1)
    columns = moved.reshape(-1, moved.shape[-1]) if per_channel else moved.reshape(-1, 1)
    if bits == "ternary":
        scale = np.mean(np.abs(columns), axis=0)
    else:
        absmax = np.max(np.abs(columns), axis=0)
        scale = absmax / hi
        if int(bits) < 8:
            scale = _weight_mse_scales(columns, lo, hi, absmax)
    scale = np.where(scale > 0, scale, 1.0)
    if per_channel:
        shape = [1] * w.ndim
        shape[axis] = -1
        s = scale.reshape(shape)
    else:
        s = scale.reshape(())
    q = np.clip(np.rint(w / s), lo, hi).astype(np.int64)
    return QuantizedWeight(q, scale if per_channel else scale.reshape(()), dtype)


def _weight_mse_scales(columns: np.ndarray, lo: int, hi: int, absmax: np.ndarray) -> np.ndarray:
    """Per column, the scale minimising the squared error of round-to-nearest quantization
    (searched over 71 fractions of absmax / hi, the first best kept)."""
    best, best_err = absmax / hi, np.full(absmax.shape, np.inf)
    for fraction in np.linspace(0.3, 1.0, 71):
        s = fraction * absmax / hi
        safe = np.where(s > 0, s, 1.0)
        err = np.sum((np.clip(np.rint(columns / safe), lo, hi) * safe - columns) ** 2, axis=0)
        better = err < best_err
        best, best_err = np.where(better, s, best), np.where(better, err, best_err)
    return np.where(absmax == 0, 1.0, best)


# --- fingerprints -------------------------------------------------------------------------


def sample_digest(sample) -> str:
    """A short digest of one sample (text line or array), for spotting calibration leaks."""
    h = hashlib.sha256()
    if isinstance(sample, str):
        h.update(b"text\0" + sample.strip().encode("utf-8"))
    else:
        a = np.ascontiguousarray(sample)
        h.update(f"array\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
