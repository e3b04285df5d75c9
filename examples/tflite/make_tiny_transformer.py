"""Write a tiny int8 transformer block as a TFLite flatbuffer, without TensorFlow.

    python examples/tflite/make_tiny_transformer.py     # rewrites tiny_transformer.tflite and tiny_transformer_inputs.txt

One post-LayerNorm encoder block the way TFLite converters lay it out: FULLY_CONNECTED
projections (keep_num_dims), RESHAPE/TRANSPOSE into heads, BATCH_MATMUL for QK^T (the
1/sqrt(d) folded into Wq) and for AV, SOFTMAX, the residual ADD, LayerNorm decomposed into
MEAN, SQUARED_DIFFERENCE, SUB, ADD, RSQRT and MUL, and a GELU feed-forward with per-channel
weights. Weights are random; every activation scale comes from a float run on calibration
inputs (min/max, asymmetric int8), as a post-training quantizer would choose them.
Needs `ai-edge-litert` (refsim's `test` extra) for the schema classes.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tflite_builder import TfliteBuilder, options  # noqa: E402

S, D, H, F = 8, 16, 2, 32  # tokens, width, heads, feed-forward width


def affine(values) -> tuple[float, int]:
    """Asymmetric int8 (scale, zero point) covering [min(values, 0), max(values, 0)]."""
    lo, hi = min(float(np.min(values)), 0.0), max(float(np.max(values)), 0.0)
    scale = max((hi - lo) / 255.0, 1e-6)
    return float(np.float32(scale)), int(np.clip(round(-128 - lo / scale), -128, 127))


def symmetric_weights(w, axis=None):
    """int8 weights and scales: per tensor (axis None) or per output channel (axis 0)."""
    bound = np.abs(w).max() if axis is None else np.abs(w).max(axis=1)
    scale = (np.maximum(bound, 1e-8) / 127.0).astype(np.float32)
    q = np.clip(np.round(w / (scale if axis is None else scale[:, None])), -127, 127).astype(np.int8)
    return q, scale


def float_block(x, p):
    """The block in float32, for calibration: returns every intermediate by name."""
    t = {"x": x}
    for name in ("q", "k", "v"):
        t[name] = x @ p[f"w{name}"].T + p[f"b{name}"]
    heads = {n: t[n].reshape(S, H, D // H).transpose(1, 0, 2) for n in ("q", "k", "v")}
    t["scores"] = heads["q"] @ heads["k"].transpose(0, 2, 1)
    e = np.exp(t["scores"] - t["scores"].max(-1, keepdims=True))
    t["probs"] = e / e.sum(-1, keepdims=True)
    t["ctx"] = (t["probs"] @ heads["v"]).transpose(1, 0, 2).reshape(S, D)
    t["attn"] = t["ctx"] @ p["wo"].T + p["bo"]
    t["h"] = x + t["attn"]
    t["mean"] = t["h"].mean(-1, keepdims=True)
    t["centered"] = t["h"] - t["mean"]
    t["sqdiff"] = t["centered"] ** 2
    t["var"] = t["sqdiff"].mean(-1, keepdims=True)
    t["var_eps"] = t["var"] + p["eps"]
    t["rstd"] = 1 / np.sqrt(t["var_eps"])
    t["normed"] = t["centered"] * t["rstd"]
    t["scaled"] = t["normed"] * p["gamma"]
    t["ln"] = t["scaled"] + p["beta"]
    t["ffn1"] = t["ln"] @ p["w1"].T + p["b1"]
    t["gelu"] = 0.5 * t["ffn1"] * (1 + np.vectorize(math.erf)(t["ffn1"] / math.sqrt(2)))
    t["ffn2"] = t["gelu"] @ p["w2"].T + p["b2"]
    t["out"] = t["ln"] + t["ffn2"]
    return t


def build(seed: int = 2024, calibration: int = 32):
    """(flatbuffer bytes, int8 sample inputs [4, 1, S, D], the input's scale and zero point)."""
    rng = np.random.default_rng(seed)
    p = {f"w{n}": rng.normal(0, 1 / math.sqrt(D), (D, D)) for n in ("q", "k", "v", "o")}
    p["wq"] = p["wq"] / math.sqrt(D // H)  # the attention's 1/sqrt(d), folded into Wq
    p.update({f"b{n}": rng.normal(0, 0.1, D) for n in ("q", "k", "v", "o")})
    p["w1"], p["b1"] = rng.normal(0, 1 / math.sqrt(D), (F, D)), rng.normal(0, 0.1, F)
    p["w2"], p["b2"] = rng.normal(0, 1 / math.sqrt(F), (D, F)), rng.normal(0, 0.1, D)
    p["gamma"], p["beta"], p["eps"] = rng.normal(1, 0.1, D), rng.normal(0, 0.1, D), 1e-3
    xs = rng.normal(0, 1, (calibration, S, D))
    runs = [float_block(x, p) for x in xs]
    scale = {name: affine(np.stack([r[name] for r in runs])) for name in runs[0]}
    scale["probs"] = (1 / 256, -128)

    b = TfliteBuilder("refsim tiny transformer block (int8)")
    act = {}

    def tensor(name, shape):
        s, z = scale[name]
        act[name] = b.tensor(shape, "int8", scale=s, zero_point=z, name=name)
        return act[name]

    b.inputs.append(tensor("x", [1, S, D]))

    def fully_connected(src, name, w, bias, per_channel, width):
        wq, ws = symmetric_weights(w, axis=0 if per_channel else None)
        sx = np.float32(scale[src][0])
        w_index = b.const(wq, "int8", scale=ws if per_channel else float(ws), zero_point=[0] * len(ws) if per_channel else 0,
                          name=f"{name}.weights")
        bias_scale = (sx * ws).astype(np.float32)
        bq = np.round(bias / bias_scale).astype(np.int32)
        b_index = b.const(bq, "int32", scale=bias_scale if per_channel else float(bias_scale),
                          zero_point=[0] * len(ws) if per_channel else 0, name=f"{name}.bias")
        b.op("FULLY_CONNECTED", [act[src], w_index, b_index], [tensor(name, [1, S, width])],
             options("FullyConnected", keepNumDims=True))

    def quantized_const(values, name):
        s, z = affine(values)
        q = np.clip(np.round(np.asarray(values) / s) + z, -128, 127).astype(np.int8)
        return b.const(q, "int8", scale=s, zero_point=z, name=name)

    for n in ("q", "k", "v"):
        fully_connected("x", n, p[f"w{n}"], p[f"b{n}"], per_channel=False, width=D)
    heads = {}
    for n in ("q", "k", "v"):
        s, z = scale[n]
        split = b.tensor([1, S, H, D // H], "int8", scale=s, zero_point=z, name=f"{n}.heads")
        b.op("RESHAPE", [act[n], b.const(np.array([1, S, H, D // H]), "int32")], [split], options("Reshape", newShape=[1, S, H, D // H]))
        heads[n] = b.tensor([1, H, S, D // H], "int8", scale=s, zero_point=z, name=f"{n}.bhsd")
        b.op("TRANSPOSE", [split, b.const(np.array([0, 2, 1, 3]), "int32")], [heads[n]], options("Transpose"))
    b.op("BATCH_MATMUL", [heads["q"], heads["k"]], [tensor("scores", [1, H, S, S])], options("BatchMatMul", adjY=True))
    b.op("SOFTMAX", [act["scores"]], [tensor("probs", [1, H, S, S])], options("Softmax", beta=1.0))
    s, z = scale["ctx"]
    ctx_heads = b.tensor([1, H, S, D // H], "int8", scale=s, zero_point=z, name="ctx.bhsd")
    b.op("BATCH_MATMUL", [act["probs"], heads["v"]], [ctx_heads], options("BatchMatMul"))
    ctx_t = b.tensor([1, S, H, D // H], "int8", scale=s, zero_point=z, name="ctx.bshd")
    b.op("TRANSPOSE", [ctx_heads, b.const(np.array([0, 2, 1, 3]), "int32")], [ctx_t], options("Transpose"))
    b.op("RESHAPE", [ctx_t, b.const(np.array([1, S, D]), "int32")], [tensor("ctx", [1, S, D])], options("Reshape", newShape=[1, S, D]))
    fully_connected("ctx", "attn", p["wo"], p["bo"], per_channel=False, width=D)
    b.op("ADD", [act["x"], act["attn"]], [tensor("h", [1, S, D])], options("Add"))
    axis = b.const(np.array([-1]), "int32")
    b.op("MEAN", [act["h"], axis], [tensor("mean", [1, S, 1])], options("Reducer", keepDims=True))
    b.op("SUB", [act["h"], act["mean"]], [tensor("centered", [1, S, D])], options("Sub"))
    b.op("SQUARED_DIFFERENCE", [act["h"], act["mean"]], [tensor("sqdiff", [1, S, D])], options("SquaredDifference"))
    b.op("MEAN", [act["sqdiff"], axis], [tensor("var", [1, S, 1])], options("Reducer", keepDims=True))
    b.op("ADD", [act["var"], quantized_const(np.array([p["eps"]]), "eps")], [tensor("var_eps", [1, S, 1])], options("Add"))
    b.op("RSQRT", [act["var_eps"]], [tensor("rstd", [1, S, 1])])
    b.op("MUL", [act["centered"], act["rstd"]], [tensor("normed", [1, S, D])], options("Mul"))
    b.op("MUL", [act["normed"], quantized_const(p["gamma"], "gamma")], [tensor("scaled", [1, S, D])], options("Mul"))
    b.op("ADD", [act["scaled"], quantized_const(p["beta"], "beta")], [tensor("ln", [1, S, D])], options("Add"))
    fully_connected("ln", "ffn1", p["w1"], p["b1"], per_channel=True, width=F)
    b.op("GELU", [act["ffn1"]], [tensor("gelu", [1, S, F])], options("Gelu", approximate=False))
    fully_connected("gelu", "ffn2", p["w2"], p["b2"], per_channel=True, width=D)
    b.op("ADD", [act["ln"], act["ffn2"]], [tensor("out", [1, S, D])], options("Add"))
    b.output(act["out"])

    sx, zx = scale["x"]
    samples = rng.normal(0, 1, (4, 1, S, D))
    inputs = np.clip(np.round(samples / sx) + zx, -128, 127).astype(np.int8)
    return b.build(), inputs, (sx, zx)


def main() -> None:
    model, inputs, _ = build()
    (HERE / "tiny_transformer.tflite").write_bytes(model)
    lines = ["# int8 inputs of tiny_transformer.tflite, one sample [1, 8, 16] per line (row-major)"]
    lines += [" ".join(str(int(v)) for v in x.reshape(-1)) for x in inputs]
    (HERE / "tiny_transformer_inputs.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {HERE / 'tiny_transformer.tflite'} ({len(model)} bytes) and {len(inputs)} int8 input samples")


if __name__ == "__main__":
    main()
