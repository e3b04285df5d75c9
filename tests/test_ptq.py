"""PTQ beyond round-to-nearest (exporters.ptq): each technique on its own small case, with
what it must achieve, and through `refsim export` on small models (integer graph,
fake-quant record and metadata agree)."""

from __future__ import annotations

import export_helpers as h
import numpy as np
import onnx
import pytest
import refsim
from onnx import helper, numpy_helper
from refsim.exporters import compare, export
from refsim.exporters.calibrate import TensorStats, quantize_weight
from refsim.exporters.ptq import clipping, smoothing
from refsim.exporters.ptq.bias_correction import bias_shift
from refsim.exporters.ptq.entropy import entropy_clip, kl_clip_bins
from refsim.exporters.ptq.gptq import gptq_round

pytest.importorskip("onnxruntime")


def output_error(x, w, w_deq):
    return float(np.sum((x @ w - x @ w_deq) ** 2))


# --- GPTQ -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, lo, hi", [("8", -128, 127), ("4", -8, 7), ("2", -2, 1), ("ternary", -1, 1)])
def test_gptq_lowers_the_layer_output_error(bits, lo, hi):
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((24, 24))
    x = rng.standard_normal((400, 24)) @ mixing  # correlated inputs: where GPTQ's updates pay off
    w = rng.standard_normal((24, 10))
    grid = quantize_weight(w, bits, per_channel=True)
    q = gptq_round(w, grid.scale, lo, hi, x.T @ x)
    assert q.min() >= lo and q.max() <= hi
    rtn = grid.q * grid.scale
    assert output_error(x, w, q * grid.scale) < 0.9 * output_error(x, w, rtn)


def test_gptq_is_round_to_nearest_for_uncorrelated_inputs():
    # With a diagonal Hessian no row's error can be compensated by another's.
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 8))
    grid = quantize_weight(w, "4", per_channel=True)
    hessian = np.diag(rng.uniform(0.5, 2.0, 16))
    np.testing.assert_array_equal(gptq_round(w, grid.scale, -8, 7, hessian, damp=0.0), grid.q)


def test_gptq_handles_dead_inputs():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((100, 6))
    x[:, 2] = 0.0  # a channel that is never active: its Hessian row and column are 0
    w = rng.standard_normal((6, 3))
    grid = quantize_weight(w, "4", per_channel=False)
    q = gptq_round(w, float(grid.scale), -8, 7, x.T @ x)
    assert np.all(np.isfinite(q)) and q.min() >= -8 and q.max() <= 7


# --- smoothing ---------------------------------------------------------------------------------


def test_smoothing_factors_follow_smoothquant():
    act = np.array([1.0, 8.0, 2.0])
    w = np.array([[1.0, -2.0], [0.5, 0.25], [4.0, 1.0]])  # row maxima 2, 0.5, 4
    s = smoothing.factors_for(act, [w], 0.5)
    expected = np.sqrt(act) / np.sqrt([2.0, 0.5, 4.0])
    np.testing.assert_allclose(s, expected / np.exp(np.mean(np.log(expected))))


def test_smoothing_is_chosen_only_where_it_pays():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 16)) * 0.1
    q8 = lambda x: clipping.fake_quant(x, np.abs(x).max(), 8)  # noqa: E731
    fq = [lambda m: quantize_weight(m, "8", True).dequantized().astype(np.float64)]
    ones = np.ones(32)
    plain = rng.standard_normal((500, 32))
    chosen = smoothing.choose(np.abs(plain).max(0), plain, [w], q8, fq)
    assert chosen.error <= smoothing.output_error(plain, [w], ones, q8, fq)  # never worse than none
    assert chosen.error > 0.6 * smoothing.output_error(plain, [w], ones, q8, fq)  # little to gain
    outliers = plain.copy()
    outliers[:, 5] *= 60.0  # one channel sixty times the others, as BERT's LayerNorm outputs have
    chosen = smoothing.choose(np.abs(outliers).max(0), outliers, [w], q8, fq)
    assert chosen.alpha is not None
    assert chosen.error < 0.1 * smoothing.output_error(outliers, [w], ones, q8, fq)  # most of the error gone


def linear_onnx(path, weight, bias):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", weight.shape[0]])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", weight.shape[1]])
    ln_w = np.ones(weight.shape[0], np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b0"], ["n"], name="/ln/LayerNormalization", axis=-1),
             helper.make_node("MatMul", ["n", "w"], ["mm"], name="/fc/MatMul"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="/fc/Add")]
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w"), numpy_helper.from_array(bias.astype(np.float32), "b"),
             numpy_helper.from_array(ln_w * np.linspace(0.5, 1.5, weight.shape[0]).astype(np.float32), "g"),
             numpy_helper.from_array(np.zeros_like(ln_w), "b0")]
    model = helper.make_model(helper.make_graph(nodes, "fc", [x], [y], inits), opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, path)
    return str(path)


@pytest.fixture(scope="module")
def outlier_layer(tmp_path_factory):
    """LayerNorm then a linear layer, on inputs with one huge channel (BERT's outliers)."""
    d = tmp_path_factory.mktemp("ptq")
    rng = np.random.default_rng(4)
    model = linear_onnx(d / "fc.onnx", rng.standard_normal((32, 16)) * 0.2, rng.standard_normal(16) * 0.1)
    data = rng.standard_normal((256, 32)).astype(np.float32)
    data[:, 7] += 40.0  # after LayerNorm, channel 7 dominates every row
    np.save(d / "calib.npy", data[:192])
    np.save(d / "eval.npy", data[192:])
    return {"model": model, "calib": str(d / "calib.npy"), "eval": str(d / "eval.npy"), "dir": d}


def integer_vs_float(case, out, **options):
    export(case["model"], out, case["calib"], **options)
    return compare(case["model"], out, case["eval"])


def test_smoothing_folds_into_the_input_requantization(outlier_layer, tmp_path):
    plain = integer_vs_float(outlier_layer, tmp_path / "plain.intq", smooth=False, gptq=False)
    smoothed = integer_vs_float(outlier_layer, tmp_path / "smooth.intq", smooth=True, gptq=False)
    m = refsim.load(tmp_path / "smooth.intq")
    fc = next(n for n in m.graph.nodes if n.op == "MatMul")
    requant = m.graph.producers()[fc.inputs[0]]
    assert requant.op == "Requant" and m.graph.tensors[requant.inputs[1]].data.size == 32  # one multiplier per channel
    assert m.metadata["export"]["ptq"]["fc"]["smooth_alpha"] in smoothing.ALPHAS
    err = {k: r.outputs["y"]["integer vs float"]["mse"] for k, r in (("plain", plain), ("smooth", smoothed))}
    assert err["smooth"] < 0.5 * err["plain"]
    # the fake-quant model divides by the same factors: it still agrees with the integer one
    assert smoothed.outputs["y"]["integer vs fake-quant"]["cosine"] > 0.9999


def test_gptq_and_bias_correction_through_export(outlier_layer, tmp_path):
    rtn = integer_vs_float(outlier_layer, tmp_path / "rtn.intq", wbits="4", gptq=False)
    gptq = integer_vs_float(outlier_layer, tmp_path / "gptq.intq", wbits="4", gptq=True)
    assert gptq.outputs["y"]["integer vs float"]["mse"] < rtn.outputs["y"]["integer vs float"]["mse"]
    m = refsim.load(tmp_path / "gptq.intq")
    assert m.metadata["export"]["gptq"] and m.metadata["export"]["ptq"]["fc"]["gptq"]
    corrected = integer_vs_float(outlier_layer, tmp_path / "bc.intq", wbits="2", gptq=False, bias_correction=True)
    uncorrected = integer_vs_float(outlier_layer, tmp_path / "nobc.intq", wbits="2", gptq=False)
    assert corrected.outputs["y"]["integer vs float"]["cosine"] > 0.9
    assert refsim.load(tmp_path / "bc.intq").metadata["export"]["ptq"]["fc"]["bias_correction"]
    assert corrected.outputs["y"]["integer vs fake-quant"]["cosine"] > 0.999
    assert uncorrected.outputs["y"]["integer vs fake-quant"]["cosine"] > 0.999


# --- bias correction ------------------------------------------------------------------------------


def test_bias_shift_cancels_the_mean_output_error():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2000, 12)) + 3.0  # inputs with a large mean
    w = rng.standard_normal((12, 5))
    wq = quantize_weight(w, "2", per_channel=True)
    shift = bias_shift(x.mean(0), w, wq)
    error = x @ w - x @ (wq.q * wq.scale)
    np.testing.assert_allclose(shift, error.mean(0), rtol=1e-9, atol=1e-12)
    assert np.abs((error - shift).mean(0)).max() < 1e-9


# --- entropy and per-layer clipping ----------------------------------------------------------------


def stats_of(values) -> TensorStats:
    s = TensorStats()
    s.observe_range(values)
    s.observe_histogram(values)
    return s


def test_entropy_clip_keeps_a_uniform_range_and_cuts_a_long_tail():
    rng = np.random.default_rng(6)
    uniform = stats_of(rng.uniform(-1, 1, 200_000))
    assert uniform.clip(8, "entropy") > 0.95 * uniform.absmax
    tailed = rng.standard_normal(200_000)
    tailed[:20] = 80.0  # a few huge outliers
    s = stats_of(tailed)
    assert 2.0 < s.clip(8, "entropy") < 0.2 * s.absmax


def test_kl_choice_is_a_bin_count_within_range():
    hist = np.zeros(2048)
    hist[:300] = 100.0
    assert 128 <= kl_clip_bins(hist, 128) <= 2048
    assert entropy_clip(np.concatenate([hist[::-1], hist]), 10.0, 8) <= 10.0


def test_choose_clip_takes_the_smallest_output_error():
    rng = np.random.default_rng(7)
    x = rng.laplace(size=(1000, 8))
    w = rng.standard_normal((8, 4))
    candidates = {"tight": 0.05, "loose": float(np.abs(x).max()), "middle": float(np.percentile(np.abs(x), 99.9))}
    method, clip = clipping.choose_clip(candidates, x, [w], 4)
    errors = {m: clipping.output_error(x, [w], c, 4) for m, c in candidates.items()}
    assert method == min(errors, key=errors.get) and clip == candidates[method]


def test_auto_and_entropy_calibration_export(outlier_layer, tmp_path):
    for method in ("auto", "entropy"):
        report = integer_vs_float(outlier_layer, tmp_path / f"{method}.intq", calib_method=method)
        assert refsim.load(tmp_path / f"{method}.intq").metadata["calibration"]["method"] == method
        assert report.outputs["y"]["integer vs fake-quant"]["cosine"] > 0.999


# --- calibration ignores padding ------------------------------------------------------------------


def test_calibration_sees_only_the_tokens_the_mask_keeps(tmp_path):
    model = h.bert(tmp_path / "bert.onnx", dynamo=False)
    tok = tmp_path / "tok.json"
    tok.write_text(h.tokenizer_json())
    text = h.text_data(tmp_path / "t.txt", 16, 5)
    scales = {}
    for length in (16, 32):
        out = tmp_path / f"b{length}.intq"
        export(model, out, text, tokenizer=str(tok), max_length=length, smooth=False, gptq=False)
        m = refsim.load(out)
        scales[length] = {n: t.scale for n, t in m.graph.tensors.items() if t.scale is not None and not t.is_const
                          and np.ndim(t.scale) == 0}
    common = set(scales[16]) & set(scales[32])
    assert len(common) > 20
    # padding to 32 tokens doubles the padded positions, yet every scale is (nearly) the same
    ratios = np.array([scales[32][n] / scales[16][n] for n in common])
    assert np.abs(ratios - 1).max() < 0.02
