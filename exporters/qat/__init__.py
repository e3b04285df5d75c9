"""Quantization-aware training whose fake-quant forward pass is the integer model itself.

    from refsim.exporters.qat import QatModel
    qat = QatModel.from_onnx("model.onnx", "calib.txt", tokenizer="tokenizer.json", mode="ita")
    qat.fit("train.txt", epochs=3)      # distillation to the float model (plus labels=... for classes)
    qat.export("model_qat.intq")        # refsim run on it == qat.run(...), bit for bit

`QatModel.from_onnx` runs `refsim export`'s pipeline (same options) up to the integer
graph. Training executes *that graph*: every node is the torch version of its refsim op
(`ops`), exact on integer-valued tensors, so the forward pass is not a model of the
integer model but the integer model (I-BERT, ITA or ITA-partial softmax, GELU and
LayerNorm, requantizations, saturating ITA accumulators, all bit for bit). The float
weights, biases, embedding tables and added constants are parameters; their integer
constants are computed from them at every step (`graph`), with straight-through
gradients, and every scale stays the exported one. `export` writes the same graph with
the trained constants, so `refsim run` of the file and the trained forward pass cannot
disagree. Needs torch (`pip install refsim[qat]`).
"""

from __future__ import annotations

from .model import QatModel, TrainReport, read_class_labels

__all__ = ["QatModel", "TrainReport", "read_class_labels"]
