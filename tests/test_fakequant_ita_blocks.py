"""The fake-quant model of an ITA export mirrors the attention block: its softmax (ITAPartialMax,
exactly: exporters/mirror/ita.py) and its output projection rounded per head, then summed
(record.head_sums, fakequant.ita_head_sums), as the block computes them. On a 4-head ViT the
block's int8 output then agrees with the fake-quant model's almost everywhere, where one
rounding of the sum of the heads (the record without head sums) moves a large share."""

from __future__ import annotations

import copy

import export_helpers as h
import numpy as np
import pytest
import refsim

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def vit_ita(tmp_path_factory):
    from refsim.exporters import export

    folder = tmp_path_factory.mktemp("fq_ita_blocks")
    onnx_path = h.vit(folder / "vit.onnx", dynamo=False)
    intq = folder / "vit.intq"
    export(onnx_path, intq, h.image_data(folder / "calib.npy", 16, 0), mode="ita-partial")
    return onnx_path, refsim.load(intq), np.load(h.image_data(folder / "eval.npy", 4, 1))


def block_outputs(onnx_path, model, images, record):
    """The first attention block's int8 output in the integer model and the fake-quant model's
    value of the same tensor (in int8 steps), over `images`."""
    from refsim.boundary import quantize_feeds
    from refsim.exporters.fakequant import fake_quant_model
    from refsim.exporters.frontend.graph import load
    from refsim.exporters.frontend.passes import canonicalize
    from refsim.exporters.runtime import FloatRunner

    meta = model.metadata
    block = model.graph.metadata["attention_blocks"][0]
    point = f"{block['name']}.out_3d"  # the block's output [1, S, E], with its scale
    float_tensor = meta["float_tensors"][point]
    g = canonicalize(load(onnx_path), {k: list(v) for k, v in meta["source_model"]["input_shapes"].items()})
    tensors = model.graph.tensors
    fq = FloatRunner(fake_quant_model(g, record, {n: t.data for n, t in tensors.items() if t.is_const},
                                      {n: t.scale for n, t in tensors.items() if t.is_const}), expose=[float_tensor])
    name = model.graph.inputs[0]
    ints, fqs = [], []
    for image in images:
        feeds = {name: image[None].astype(np.float32)}
        seen = {}
        model.run(quantize_feeds(model, dict(feeds)), trace=lambda node, n, a: seen.__setitem__(n, np.asarray(a)))
        ints.append(seen[point].reshape(-1))
        fqs.append(np.asarray(fq.run(feeds)[float_tensor], np.float64).reshape(-1) / float(tensors[point].scale))
    return np.concatenate(ints), np.concatenate(fqs)


def test_the_fake_quant_model_rounds_each_heads_output_projection(vit_ita):
    onnx_path, model, images = vit_ita
    record = model.metadata["fake_quant"]
    (entry,) = [e for e in record["head_sums"] if e["heads"] == 4][:1]
    ints, fqs = block_outputs(onnx_path, model, images, record)
    assert np.all(np.abs(fqs - np.rint(fqs)) < 1e-3)  # on the int8 grid
    moved = np.mean(np.rint(fqs) != ints)
    assert moved < 0.01, moved
    # The same record rounding the float graph's sum of the heads once, at the block's scale.
    once = copy.deepcopy(record)
    once["head_sums"] = []
    once["tensors"].append([entry["tensor"], entry["scale"], 8, True, entry["rounding"]])
    ints, fqs = block_outputs(onnx_path, model, images, once)
    moved_once = np.mean(np.rint(fqs) != ints)
    assert moved_once > 0.05, moved_once
    print(f"per head: {moved:.4%} of the block's outputs differ, one rounding of the sum: {moved_once:.4%}")  # -rP
