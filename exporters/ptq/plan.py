"""The PTQ plan of one export: what the walker asks for every linear layer (see the package docstring)."""

from __future__ import annotations

import numpy as np

from ..calibrate import Calibration, QuantizedWeight, TensorStats, qmax, quantize_weight, weight_range
from . import clipping, smoothing
from .bias_correction import bias_shift
from .gptq import gptq_round


class Ptq:
    """The PTQ choices of one export (see the module docstring)."""

    def __init__(self, options, calibration: Calibration):
        self.options = options
        self.calibration = calibration
        self._smoothing: dict[tuple[str, int], tuple[smoothing.Smoothing, float]] = {}
        self.report: dict[str, dict] = {}  # layer -> what was chosen, stored in the .intq metadata

    # --- before the walk -----------------------------------------------------------------------

    def choose_clips(self, g) -> None:
        """`--calib-method auto`: the clip of each linear layer's input, by the error of the
        layers it feeds (`clipping`)."""
        if self.options.calib_method != "auto":
            return
        by_input: dict[tuple[str, int], list[np.ndarray]] = {}
        for node in g.nodes:
            if _is_linear(g, node):
                bits = self.options.layer(node.scope or node.name).abits
                if bits < 16:
                    by_input.setdefault((node.inputs[0], bits), []).append(g.const(node.inputs[1]).astype(np.float64))
        for (tensor, bits), weights in by_input.items():
            stats = self.calibration.inputs.get(tensor)
            if stats is None or not stats.rows:
                continue
            candidates = {m: self.calibration.clip(tensor, bits, m) for m in clipping.METHODS}
            method, clip = clipping.choose_clip(candidates, stats.rows_sample, weights, bits)
            self.calibration.clips[(tensor, bits)] = clip

    # --- one linear layer ----------------------------------------------------------------------

    def linear(self, walker, node, w: np.ndarray, settings):
        """(integer input Value, QuantizedWeight, bias shift or None) for linear layer `node`."""
        tensor, bits = node.inputs[0], settings.abits
        stats = self.calibration.inputs.get(tensor)
        have_stats = stats is not None and stats.rows > 0
        layer = walker.layer_name(node)
        factors = None
        if self.options.smooth and have_stats and bits < 16 and walker.needs_requant(tensor, bits):
            chosen, scale = self.smoothing_for(walker, tensor, bits)
            if chosen.alpha is not None:
                factors = chosen.factors
                x = walker.get_smoothed(tensor, bits, factors, scale, node, 0)
                self.report.setdefault(layer, {})["smooth_alpha"] = chosen.alpha
        if factors is None:
            x = walker.get(tensor, bits, node, 0)
        w_eff = w if factors is None else w * factors[:, None]
        wq = self.weight(tensor, w_eff, settings, settings.per_channel, layer, factors)
        shift = None
        if self.options.bias_correction and have_stats and not settings.keep_float:
            mean = stats.mean if factors is None else stats.mean / factors
            shift = bias_shift(mean, w_eff, wq)
            self.report.setdefault(layer, {})["bias_correction"] = True
        return x, wq, shift

    def weight(self, tensor: str, w: np.ndarray, settings, per_channel: bool, layer: str, factors=None) -> QuantizedWeight:
        """The quantized weights of a linear layer whose input is `tensor` (divided by
        `factors` when smoothed): the ordinary grid, and with --gptq GPTQ's rounding."""
        wq = quantize_weight(w, settings.wbits, per_channel, axis=-1)
        stats = self.calibration.inputs.get(tensor)
        if not self.options.gptq or stats is None or not stats.rows or settings.keep_float:
            return wq
        gram = stats.gram if factors is None else stats.gram / np.outer(factors, factors)
        lo, hi, _ = weight_range(settings.wbits)
        scale = wq.scale if per_channel else float(wq.scale)
        self.report.setdefault(layer, {})["gptq"] = True
        return QuantizedWeight(gptq_round(w, scale, lo, hi, gram), wq.scale, wq.dtype)

    def smoothing_for(self, walker, tensor: str, bits: int) -> tuple[smoothing.Smoothing, float]:
        """The smoothing of `tensor` at `bits` bits, shared by every linear layer it feeds,
        and the scale of the smoothed tensor."""
        key = (tensor, bits)
        if key not in self._smoothing:
            stats = self.calibration.inputs[tensor]
            weights, quantizers = [], []
            for user in walker.users.get(tensor, []):
                if _is_linear(walker.g, user):
                    s = self.options.layer(walker.layer_name(user))
                    if s.abits == bits:
                        weights.append(walker.g.const(user.inputs[1]).astype(np.float64))
                        quantizers.append(_weight_fake_quant(s))
            sample = stats.rows_sample
            method = self.options.calib_method

            def act_clip(x: np.ndarray) -> float:
                t = TensorStats()
                t.observe_range(x)
                t.observe_histogram(x)
                if method != "auto":
                    return t.clip(bits, method, self.options.percentile)
                candidates = {m: t.clip(bits, m, self.options.percentile) for m in clipping.METHODS}
                return clipping.choose_clip(candidates, x, weights, bits)[1]

            def quantize_act(x: np.ndarray) -> np.ndarray:
                return clipping.fake_quant(x, act_clip(x), bits)

            chosen = smoothing.choose(stats.absmax, sample, weights, quantize_act, quantizers)
            scale = act_clip(sample / chosen.factors) / qmax(bits)
            self._smoothing[key] = (chosen, scale)
        return self._smoothing[key]


def _is_linear(g, node) -> bool:
    return (node.op == "MatMul" and g.is_const(node.inputs[1]) and not g.is_const(node.inputs[0])
            and g.const(node.inputs[1]).ndim == 2)


def _weight_fake_quant(settings):
    def fq(w: np.ndarray) -> np.ndarray:
        return quantize_weight(w, settings.wbits, settings.per_channel, axis=-1).dequantized().astype(np.float64)
    return fq
