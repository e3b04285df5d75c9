"""Models written by onnxruntime's quantizer, imported and compared with onnxruntime itself.

A tiny BERT (random weights, 1 layer, hidden 32, built with transformers in the test) with
sentence-transformers' masked mean pooling is exported by torch.onnx.export and quantized
by `quantize_static` as QDQ and as QOperator (uint8 activations, int8 weights). With
`--requant ort --float-ops ort` refsim must reproduce onnxruntime: every integer tensor both
graphs name is compared (exact / total is printed), and the pooled embedding must reach a
cosine of 0.999 (the pooling tail is float in onnxruntime, rational in refsim).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from refsim.exporters.importers import dequantize_outputs, import_model, quantize_inputs

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()

    class MeanPooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask):
            h = self.bert(input_ids=ids).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    float_path = folder / "float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(MeanPooled().eval(), (ids, mask), str(float_path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["emb"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([feeds])

        def get_next(self):
            return next(self.feeds, None)

    paths = {}
    for fmt in (QuantFormat.QDQ, QuantFormat.QOperator):
        paths[fmt.name] = folder / f"{fmt.name}.onnx"
        quantize_static(str(float_path), str(paths[fmt.name]), Reader(), quant_format=fmt,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return paths, feeds


def _ort_tensors(path, feeds, names):
    model = onnx.load(str(path))
    for name, elem in names.items():
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in model.graph.output], session.run(None, feeds)))


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_onnxruntime_quantize_static_reproduced(tiny_bert, fmt, record_property):
    paths, feeds = tiny_bert
    model = import_model(paths[fmt], requant="ort", float_ops="ort")
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(paths[fmt])))
    onnx_types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    elem = {"uint8": onnx.TensorProto.UINT8, "int8": onnx.TensorProto.INT8}
    shared = {name: elem[t.dtype.name] for name, t in model.graph.tensors.items()
              if t.dtype.name in elem and onnx_types.get(name) == elem[t.dtype.name] and not t.is_const}
    reference = _ort_tensors(paths[fmt], feeds, shared)
    traced = {}
    outputs = model.run(quantize_inputs(model, feeds), trace=lambda node, name, a: traced.__setitem__(name, a))
    exact = sum(np.array_equal(traced[n], reference[n]) for n in shared if n in traced)
    got = dequantize_outputs(model, outputs)["emb"].astype(np.float64).reshape(-1)
    want = reference["emb"].astype(np.float64).reshape(-1)
    cosine = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
    record_property(f"{fmt}_integer_tensors_exact", f"{exact}/{len(shared)}")
    record_property(f"{fmt}_cosine", cosine)
    print(f"\n{fmt}: {exact}/{len(shared)} integer tensors exact against onnxruntime, embedding cosine {cosine:.7f}")
    assert len(shared) >= 10
    assert exact == len(shared)
    assert cosine >= 0.999


def test_integer_variants_stay_the_default(tiny_bert):
    paths, _ = tiny_bert
    ops = {n.op for n in import_model(paths["QDQ"]).graph.nodes}
    assert "IBertSoftmax" in ops and "IBertLayerNorm" in ops and not ops & {"OrtSoftmax", "LayerNormRound", "Lut2"}
