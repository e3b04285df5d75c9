"""Models Brevitas exports, imported and compared with the producer's own runtimes.

Small networks built in the test (seeded): an MLP with float biases (Brevitas' default: no
bias quantizer) exported by `export_qonnx` and, at 4 bits, by `export_onnx_qcdq`
(QuantizeLinear -> Clip -> DequantizeLinear), and a `QuantMultiheadAttention` exported by
`export_qonnx`, whose float projections are reshaped and transposed before their Quant
nodes. Oracles: qonnx's `execute_onnx` for QONNX, Brevitas in torch and onnxruntime for QCDQ.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from refsim.exporters.importers import dequantize_outputs, import_model, quantize_inputs

torch = pytest.importorskip("torch")
qnn = pytest.importorskip("brevitas.nn")
pytest.importorskip("qonnx")
ort = pytest.importorskip("onnxruntime")


def _mlp(bits: int):
    torch.manual_seed(0)
    net = torch.nn.Sequential(qnn.QuantIdentity(bit_width=bits, return_quant_tensor=True),
                              qnn.QuantLinear(16, 32, bias=True, weight_bit_width=bits),
                              qnn.QuantReLU(bit_width=bits, return_quant_tensor=True),
                              qnn.QuantLinear(32, 10, bias=True, weight_bit_width=bits),
                              qnn.QuantIdentity(bit_width=bits)).eval()
    x = torch.randn(480, 16)
    with torch.no_grad():
        net(x)  # calibrates the activation scales
    return net, x


def _run(path, x: np.ndarray, **options) -> np.ndarray:
    model = import_model(path, **options)
    name = onnx.load(str(path)).graph.input[0].name
    return next(iter(dequantize_outputs(model, model.run(quantize_inputs(model, {name: x}))).values())), model


def _qonnx_execute(path, x: np.ndarray) -> np.ndarray:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    wrapper = ModelWrapper(str(path))
    return execute_onnx(wrapper, {wrapper.graph.input[0].name: x})[wrapper.graph.output[0].name]


def _export(fn, net, x, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(net, x, export_path=str(path), **kw)


def test_export_qonnx_mlp_float_bias_equals_qonnx_executor(tmp_path, record_property):
    """The float bias is carried to 2^-16 of an accumulator step (no longer rounded to
    whole steps, which left 9 of 4,800 outputs one step off): every output equals qonnx's."""
    from brevitas.export import export_qonnx

    net, x = _mlp(8)
    path = tmp_path / "mlp.onnx"
    _export(export_qonnx, net, x, path)
    want = _qonnx_execute(path, x.numpy())
    got, model = _run(path, x.numpy())
    with torch.no_grad():
        assert np.array_equal(want, net(x).numpy())  # the oracle is Brevitas' own result
    exact = int(np.sum(got == want))
    record_property("brevitas_qonnx_mlp_exact", f"{exact}/{want.size}")
    assert exact == want.size == 4800
    assert any(n.op == "Mul" and n.outputs[0].endswith(".fine") for n in model.graph.nodes)  # the fraction bits


def test_export_onnx_qcdq_4bit_clip_narrows_and_equals_brevitas(tmp_path, record_property):
    """Q -> Clip -> DQ at 4 bits imports as int4 tensors. refsim equals Brevitas in torch and
    onnxruntime without graph optimizations on every output. (onnxruntime's default
    optimizations fuse DQ -> Gemm -> Q and round the float bias to int32 accumulator steps:
    that run differs from Brevitas itself, so it is no oracle.)"""
    from brevitas.export import export_onnx_qcdq

    net, x = _mlp(4)
    path = tmp_path / "qcdq.onnx"
    _export(export_onnx_qcdq, net, x, path, opset_version=13)
    assert "Clip" in {n.op_type for n in onnx.load(str(path)).graph.node}
    got, model = _run(path, x.numpy(), requant="ort")
    with torch.no_grad():
        want = net(x).numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    plain = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    record_property("brevitas_qcdq_exact", f"{int(np.sum(got == want))}/{want.size}")
    assert np.array_equal(got, want) and np.array_equal(got, plain)
    assert {"int4", "uint4"} <= {t.dtype.name for t in model.graph.tensors.values()}


def test_export_qonnx_multihead_attention_matches_qonnx(tmp_path, record_property):
    """The projections' float Add results are reshaped and transposed (and the query divided
    by sqrt(d)) before their Quant nodes: refsim quantizes first and moves the integers.
    qonnx computes the Softmax of the wide score accumulator in float32 (onnxruntime): with
    --float-ops ort refsim replays it (FloatSoftmax) and every output equals qonnx's; refsim's
    integer softmax, the default, is within one output step (the documented residue)."""
    from brevitas.export import export_qonnx

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = qnn.QuantIdentity(return_quant_tensor=True)
            self.mha = qnn.QuantMultiheadAttention(16, 2, batch_first=True, packed_in_proj=False)
            self.out = qnn.QuantIdentity()

        def forward(self, x):
            q = self.inp(x)
            return self.out(self.mha(q, q, q, need_weights=False)[0])

    torch.manual_seed(0)
    net = Attention().eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        net(x)
    path = tmp_path / "mha.onnx"
    _export(export_qonnx, net, x, path)
    want = _qonnx_execute(path, x.numpy())
    got, _ = _run(path, x.numpy())
    step = float(net.out.act_quant.scale().detach())
    exact = int(np.sum(got == want))
    record_property("brevitas_mha_exact", f"{exact}/{want.size}")
    print(f"\nQuantMultiheadAttention: {exact}/{want.size} outputs equal qonnx's, the rest one step ({step}) off")
    assert np.max(np.abs(got - want)) <= step * (1 + 1e-6)
    assert exact >= want.size * 0.6
    replayed, model = _run(path, x.numpy(), float_ops="ort")
    assert "FloatSoftmax" in {n.op for n in model.graph.nodes}
    record_property("brevitas_mha_float_ops_ort_exact", f"{int(np.sum(replayed == want))}/{want.size}")
    np.testing.assert_array_equal(replayed, want)
