"""Exporter building blocks with hand-worked expectations: calibration clips, weight
quantization, layers.json, metrics, the progress bar, the fake-quant record."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from refsim.exporters.calibrate import TensorStats, quantize_weight, sample_digest
from refsim.exporters.comparison import classification_metrics, regression_metrics
from refsim.exporters.config import ExportOptions, LayerConfig
from refsim.exporters.dyadic import ExportError
from refsim.exporters.progress import Progress


def stats_of(values) -> TensorStats:
    s = TensorStats()
    x = np.asarray(values, np.float64)
    s.observe_range(x)
    s.observe_histogram(x)
    return s


def test_minmax_clip_is_the_largest_magnitude():
    s = stats_of([-3.0, 0.5, 2.0])
    assert s.clip(8, "minmax") == 3.0
    assert s.absmax == 3.0 and s.lo == -3.0 and s.hi == 2.0


def test_sixteen_bit_points_get_one_bit_of_headroom():
    assert stats_of([-3.0, 2.0]).clip(16, "mse") == 6.0


def test_row_variance_is_the_largest_over_batches_and_rows():
    s = TensorStats()
    s.observe_rows(np.array([[[1.0, 3.0], [0.0, 0.0]]]))  # rows: sum (x - mean)^2 = 2, 0
    s.observe_rows(np.array([[-2.0, 2.0, 2.0, -2.0]]))  # 16
    s.observe_rows(np.array([[5.0, 5.0, 5.0, 5.0]]))  # 0
    assert s.row_sumsq == 16.0


def test_percentile_clip_on_a_uniform_distribution():
    # 100001 evenly spaced values in [-1, 1]: the 1st and 99th percentiles are -0.98 and 0.98.
    s = stats_of(np.linspace(-1, 1, 100001))
    assert s.clip(8, "percentile", (1.0, 99.0)) == pytest.approx(0.98, abs=1e-3)
    # Asymmetric percentiles: the symmetric clip covers the wider side.
    assert s.clip(8, "percentile", (10.0, 99.0)) == pytest.approx(0.98, abs=1e-3)


def test_mse_clip_matches_the_known_gaussian_optimum():
    # For a Gaussian with uniform rounding noise s^2/12, the MSE-optimal 4-bit clip is about
    # 2.55 sigma (Banner et al., ACIQ): far inside the largest of 200000 samples (~4.5 sigma).
    x = np.random.default_rng(0).standard_normal(200000)
    s = stats_of(x)
    assert s.clip(4, "mse") == pytest.approx(2.55, abs=0.2)
    assert s.clip(4, "mse") < s.clip(8, "mse") < s.clip(8, "minmax")


def test_all_zero_tensor_gets_a_harmless_scale():
    assert stats_of(np.zeros(10)).clip(8, "mse") == 1.0


def test_ternary_weights_use_absmean():
    # mean |w| = (0.5 + 1.5 + 1.0 + 0.1) / 4 = 0.775; w / 0.775 = [[0.65, -1.94], [1.29, 0.13]]
    q = quantize_weight(np.array([[0.5, -1.5], [1.0, 0.1]]), "ternary", per_channel=False)
    assert q.dtype == "ternary" and float(q.scale) == pytest.approx(0.775)
    assert q.q.tolist() == [[1, -1], [1, 0]]


def test_per_channel_int8_weights_use_column_absmax():
    w = np.array([[0.5, -2.54], [-1.27, 1.0]])
    q = quantize_weight(w, "8", per_channel=True)
    assert q.dtype == "int8"
    assert q.scale.tolist() == pytest.approx([1.27 / 127, 2.54 / 127])
    # column 0: 0.5/0.01 = 50, -127; column 1: -127, 1.0/0.02 = 50
    assert q.q.tolist() == [[50, -127], [-127, 50]]


def test_low_bit_weights_stay_in_range():
    w = np.random.default_rng(1).standard_normal((64, 8))
    for bits, lo, hi, dtype in (("2", -2, 1, "int2"), ("3", -4, 3, "int4"), ("4", -8, 7, "int4"), ("5", -16, 15, "int8"),
                                ("6", -32, 31, "int8"), ("7", -64, 63, "int8"), ("16", -32768, 32767, "int16")):
        q = quantize_weight(w, bits, per_channel=True)
        assert q.q.min() >= lo and q.q.max() <= hi and q.dtype == dtype
        assert q.q.min() == lo or q.q.max() == hi  # the grid is used to its edge


def test_layer_config_patterns_merge_in_order():
    cfg = LayerConfig.from_dict({"*.dense": {"abits": 16}, "enc.output.dense": {"wbits": 4}, "head": "keep_float"})
    options = ExportOptions(layers=cfg)
    assert options.layer("enc.output.dense").abits == 16
    assert options.layer("enc.output.dense").wbits == "4"
    assert options.layer("enc.attention.query").abits == 8
    kept = options.layer("head")
    assert kept.keep_float and kept.wbits == "16" and kept.abits == 16
    assert cfg.unused_patterns(["head"]) == ["*.dense", "enc.output.dense"]


@pytest.mark.parametrize("doc, message", [
    ({"x": {"bits": 4}}, "unknown setting"),
    ({"x": {"wbits": 9}}, "weight bits"),
    ({"x": {"abits": 12}}, "activation bits"),
    ({"x": 7}, "must be an object"),
    ([1, 2], "expected an object"),
])
def test_layer_config_errors_are_one_line(doc, message):
    with pytest.raises(ExportError, match=message) as e:
        LayerConfig.from_dict(doc, "layers.json")
    assert "\n" not in str(e.value)


def test_export_options_reject_unknown_modes_and_bits():
    with pytest.raises(ExportError, match="unknown mode"):
        ExportOptions(mode="tflite")
    with pytest.raises(ExportError, match="weight bits"):
        ExportOptions(wbits="1")
    with pytest.raises(ExportError, match="activation bits"):
        ExportOptions(abits=9)


def test_classification_metrics_hand_worked():
    # truth [0,0,1,1], predicted [0,1,1,1]: accuracy 3/4; precision 1 and 2/3; recall 1/2 and 1;
    # F1 2/3 and 4/5; MCC (2*1 - 1*0) / sqrt(3*2*2*1) = 1/sqrt(3).
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["mcc"] == pytest.approx(1 / math.sqrt(3))


def test_regression_metrics_rank_ties():
    # Spearman of [1, 2, 2, 3] against [10, 20, 20, 30]: identical rankings with a tie -> 1.
    m = regression_metrics(np.array([1.0, 2, 2, 3]), np.array([10.0, 20, 20, 30]))
    assert m["spearman"] == pytest.approx(1.0) and m["pearson"] == pytest.approx(1.0)
    m = regression_metrics(np.array([1.0, 2, 3]), np.array([3.0, 2, 1]))
    assert m["spearman"] == pytest.approx(-1.0)


def test_sample_digests_tell_text_from_arrays():
    assert sample_digest("a sentence") == sample_digest("  a sentence\n")
    assert sample_digest("a sentence") != sample_digest("another")
    assert sample_digest(np.zeros(3, np.int64)) != sample_digest(np.zeros(3, np.int32))
    assert len(sample_digest("x")) == 16


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_on_terminals_only():
    tty = _Terminal()
    bar = Progress(True, tty)
    for i in range(1, 4):
        bar(i, 3, "calibrating")
    drawn = tty.getvalue()
    assert "calibrating" in drawn and "3/3" in drawn and drawn.endswith("\n")
    pipe = io.StringIO()
    Progress(True, pipe)(3, 3, "x")
    Progress(False, _Terminal())(3, 3, "x")
    assert pipe.getvalue() == ""
