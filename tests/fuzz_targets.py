"""Fuzz targets for what refsim reads from users: `.intq` models, ONNX models (the importers),
and input files (`.npy`, `.npz`, text). Each target takes bytes; refsim must either accept
them or raise a RefsimError whose message is one line. Anything else is a defect.

Coverage-guided with atheris (libFuzzer) when it is installed, else a plain mutation loop
over the same seeds (byte flips, inserts, deletes, splices):

    python tests/fuzz_targets.py intq -atheris_runs=100000
    python tests/fuzz_targets.py onnx -atheris_runs=100000
    python tests/fuzz_targets.py inputs -atheris_runs=100000
    python tests/fuzz_targets.py onnx -max_total_time=300              (a time budget instead)
    python tests/fuzz_targets.py inputs --plain --runs 1000 --seed 3     (no atheris)

With FUZZ_LOG=file.jsonl each non-refsim exception is logged (kind, message, where) and
the run goes on, so one campaign finds every kind; without it the first one stops the run
(what tests/test_fuzz.py wants). At the end the run prints its executions, the exceptions
by kind and its peak memory (VmHWM); a peak more than FUZZ_MEMORY_LIMIT_MIB (1024) above
what the process held before the first input counts as a defect.

The first byte of every input picks a seed and a mode; the rest is the file, so libFuzzer's
mutations act on real file bytes. `.intq` mode 1 and ONNX mode 1 repair what a mutation
broke that would stop every input early (the header checksum; protobuf framing, by
mutating the parsed model instead of its bytes).
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import resource
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TMP = Path(os.environ.get("FUZZ_TMP", "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()))


# --- seeds --------------------------------------------------------------------------------------


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3, "hello": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def intq_seeds() -> list[bytes]:
    """Small valid models touching every header feature: packed types, blobs, metadata the
    runtime reads (labels, input quantization, a tokenizer), symbolic shapes, quant fields."""
    from refsim import GraphBuilder
    from refsim.intq import to_bytes
    from seed_models import sample_graph

    seeds = [(ROOT / "examples" / "tiny_mlp.intq").read_bytes()]
    rng = np.random.default_rng(5)
    seeds.append(to_bytes(sample_graph(quantized=True, softmax=True)))

    b = GraphBuilder("image")
    x = b.input("x", "int8", [1, 1, 4, 4])
    b.metadata["input_quant"] = {"x": {"scale": 0.02, "zero_point": 0, "dtype": "int8"}}
    b.metadata["labels"] = ["no", "yes"]
    c = b.node("Conv", [x, b.const(rng.integers(-3, 3, (2, 1, 2, 2)), "int8", name="k")], outputs="c", name="conv",
               pads=[1, 1, 0, 0], strides=[2, 2])
    p = b.node("MaxPool", [c], outputs="p", name="pool", kernel_shape=[2, 2])
    f = b.node("Reshape", [p], outputs="f", name="flat", shape=[1, -1])
    y = b.node("Requant", [f, b.const(3, "int32", name="m"), b.const(4, "int8", name="sh")], outputs="y", name="rq", dtype="int8")
    n = b.node("IBertLayerNorm", [y], outputs="n", name="ln", shift=0)
    b.output(b.node("Slice", [n], outputs="out", name="slice", starts=[0], ends=[2], axes=[1]))
    seeds.append(to_bytes(b.build()))

    b = GraphBuilder("text")
    ids = b.input("input_ids", "int32", [1, 6])
    mask = b.input("attention_mask", "int8", [1, 6])
    b.blobs["tokenizer.json"] = _tokenizer_json().encode()
    b.metadata["tokenizer"] = {"blob": "tokenizer.json", "max_length": 6, "padding": "max_length", "truncation": True,
                               "pad_id": 0, "inputs": {"input_ids": "ids", "attention_mask": "attention_mask"}}
    e = b.node("Gather", [b.const(rng.integers(-100, 100, (5, 4)), "int8", name="emb"), ids], outputs="e", name="embed")
    t = b.node("Transpose", [e], outputs="t", name="tr", perm=[0, 2, 1])
    s = b.node("ReduceSum", [t], outputs="s", name="sum", axes=[2], keepdims=False)
    b.output(s, b.node("Cast", [mask], outputs="m32", name="cast", dtype="int32"))
    seeds.append(to_bytes(b.build()))
    return seeds


def onnx_seeds() -> list:
    """Quantized ONNX graphs of each format, and standard ops folded on constants."""
    from onnx import TensorProto, helper, numpy_helper

    def init(name, value, dtype=None):
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    def model(nodes, inputs, outputs, inits, opsets=(("", 17),)):
        graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
        m.ir_version = 9
        return m

    F, I8, U8 = TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8
    vi = helper.make_tensor_value_info
    rng = np.random.default_rng(1)
    seeds = []
    # QDQ: Q -> DQ -> MatMul(DQ w) -> Q -> DQ -> Softmax -> Q, with a Pad, Reshape, Concat, Slice
    seeds.append(model([
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "hs", "z"], ["hq"]),
        helper.make_node("Pad", ["hq", "pads"], ["hp"], mode="constant"),
        helper.make_node("Reshape", ["hp", "shape"], ["hr"]),
        helper.make_node("Concat", ["hr", "hr"], ["hc"], axis=1),
        helper.make_node("Slice", ["hc", "starts", "ends", "axes"], ["hs2"]),
        helper.make_node("DequantizeLinear", ["hs2", "hs", "z"], ["hd"]),
        helper.make_node("Softmax", ["hd"], ["p"], axis=-1),
        helper.make_node("QuantizeLinear", ["p", "ps", "pz"], ["y"]),
    ], [vi("x", F, [2, 8])], [vi("y", U8, None)], [
        init("s", 0.02, np.float32), init("z", 0, np.int8), init("w", rng.integers(-127, 128, (8, 4)), np.int8),
        init("ws", rng.random(4) * 0.01 + 0.001, np.float32), init("wz", np.zeros(4), np.int8), init("hs", 0.05, np.float32),
        init("pads", [0, 1, 0, 1], np.int64), init("shape", [2, -1], np.int64), init("starts", [1], np.int64),
        init("ends", [9], np.int64), init("axes", [1], np.int64), init("ps", 1 / 256, np.float32), init("pz", 0, np.uint8),
    ], (("", 21),)))
    # QOperator: QLinearMatMul, Reshape, QLinearConv
    seeds.append(model([
        helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"]),
        helper.make_node("Reshape", ["y", "shape"], ["img"]),
        helper.make_node("QLinearConv", ["img", "ys", "yz", "w", "wsc", "wz", "cs", "cz", "bias"], ["c"], pads=[1, 0, 0, 1]),
        helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Flatten", ["t"], ["f"], axis=1),
    ], [vi("a", U8, [4, 8])], [vi("f", U8, None)], [
        init("as", 0.0137, np.float32), init("az", 131, np.uint8), init("b", rng.integers(-128, 128, (8, 4)), np.int8),
        init("bs", 0.004, np.float32), init("bz", 0, np.int8), init("ys", 0.03, np.float32), init("yz", 120, np.uint8),
        init("shape", [1, 1, 4, 4], np.int64), init("w", rng.integers(0, 256, (2, 1, 2, 2)), np.uint8),
        init("wsc", 0.0077, np.float32), init("wz", 128, np.uint8), init("cs", 0.04, np.float32),
        init("cz", 100, np.uint8), init("bias", [5, -5], np.int32),
    ], (("", 17),)))
    # QONNX: Quant, Conv, Relu, MaxPool, Trunc, Gemm, BipolarQuant
    q = "qonnx.custom_op.general"
    seeds.append(model([
        helper.make_node("Quant", ["x", "si", "zero", "b8"], ["xq"], domain=q, signed=1, narrow=0, rounding_mode="ROUND"),
        helper.make_node("Quant", ["w", "sw", "zero", "b4"], ["wq"], domain=q, signed=1, narrow=1, rounding_mode="ROUND"),
        helper.make_node("Conv", ["xq", "wq"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Quant", ["r", "sh", "zero", "b4"], ["hq"], domain=q, signed=0, narrow=0, rounding_mode="FLOOR"),
        helper.make_node("MaxPool", ["hq"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Trunc", ["p", "sh", "zero", "b4", "st", "zero", "b3"], ["t"], domain=q, rounding_mode="FLOOR"),
        helper.make_node("Flatten", ["t"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w2"], ["g"]),
        helper.make_node("Quant", ["g", "so", "zero", "b8"], ["y"], domain=q, signed=1, narrow=0, rounding_mode="ROUND"),
        helper.make_node("BipolarQuant", ["g", "one"], ["sign"], domain=q),
    ], [vi("x", F, [1, 2, 4, 4])], [vi("y", F, None), vi("sign", F, None)], [
        init("si", 2.0**-4, np.float32), init("zero", 0.0, np.float32), init("b8", 8.0, np.float32),
        init("w", rng.standard_normal((2, 2, 3, 3)), np.float32), init("sw", 2.0**-3, np.float32),
        init("b4", 4.0, np.float32), init("sh", 2.0**-3, np.float32), init("st", 2.0**-2, np.float32),
        init("b3", 3.0, np.float32), init("w2", rng.integers(-2, 3, (8, 3)) * 0.25, np.float32),
        init("so", 2.0**-2, np.float32), init("one", 1.0, np.float32),
    ], (("", 13), (q, 1))))
    # quantlib/Deeploy: integers in float tensors, custom ops
    seeds.append(model([
        helper.make_node("MatMul", ["x", "w"], ["acc"]),
        helper.make_node("RequantShift", ["acc", "mul", "add"], ["y"], div=4, n_levels_out=256, signed=1),
        helper.make_node("ITAMax", ["y"], ["sm"], n_levels=256),
        helper.make_node("iGELU", ["acc"], ["g"], b=-30, one=900),
        helper.make_node("iLayerNorm", ["y", "lw", "lb"], ["ln"], D=256, n_levels=256),
        helper.make_node("IntegerDiv", ["y", "d"], ["q"], domain="PACTOps", Delta=4, eps=1, eta=2),
        helper.make_node("IntegerMean", ["q"], ["m"], axes=[1], keepdims=1),
    ], [vi("x", F, [1, 4])], [vi(n, F, None) for n in ("sm", "g", "ln", "m")], [
        init("w", [[1, 2], [0, -1], [2, 0], [-1, 1]], np.float32), init("mul", [3, 5], np.float32),
        init("add", [1, -2], np.float32), init("lw", [1, 2], np.float32), init("lb", [0, 3], np.float32),
        init("d", [[2]], np.float32),
    ], (("", 13), ("PACTOps", 1))))
    # standard ops whose outputs attributes size, folded on constants at import
    seeds.append(model([
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("ConstantOfShape", ["cshape"], ["ones"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Expand", ["ones", "eshape"], ["ex"]),
        helper.make_node("Tile", ["ex", "reps"], ["tiled"]),
        helper.make_node("Range", ["r0", "r1", "r2"], ["rng"]),
        helper.make_node("Resize", ["img", "", "scales"], ["big"], mode="nearest"),
        helper.make_node("Shape", ["big"], ["bs"]),
        helper.make_node("ReduceProd", ["bs"], ["count"], keepdims=0),
        helper.make_node("Add", ["tiled", "rng"], ["sum"]),
        helper.make_node("Cast", ["sum"], ["sum8"], to=TensorProto.INT8),
        helper.make_node("Gather", ["xq", "sum"], ["gathered"], axis=1),
        helper.make_node("Squeeze", ["gathered", "sq"], ["out"]),
        helper.make_node("Unsqueeze", ["out", "sq"], ["out2"]),
        helper.make_node("Split", ["out2"], ["a", "b"], axis=2),
    ], [vi("x", F, [1, 8])], [vi("a", I8, None), vi("b", I8, None)], [
        init("s", 0.1, np.float32), init("z", 0, np.int8), init("cshape", [2], np.int64), init("eshape", [2, 2], np.int64),
        init("reps", [1, 2], np.int64), init("r0", 0, np.int64), init("r1", 4, np.int64), init("r2", 1, np.int64),
        init("img", np.zeros((1, 1, 2, 2)), np.float32), init("scales", [1, 1, 2, 2], np.float32), init("sq", [0], np.int64),
    ], (("", 17),)))
    return seeds


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npz(compressed=True, **arrays) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def input_seeds(models) -> list[tuple[int, str, bytes]]:
    """(model index, suffix, file bytes) for the intq seed models."""
    rng = np.random.default_rng(2)
    x8 = rng.integers(-128, 128, (2, 16)).astype(np.int8)
    return [
        (0, ".txt", b"1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n# a comment\n-1,-2,-3,-4,-5,-6,-7,-8,0,0,0,0,0,0,0,127\n"),
        (0, ".npy", _npy(x8)),
        (0, ".npz", _npz(x=x8)),
        (0, ".npz", _npz(False, x=x8.astype(np.int64))),
        (1, ".npz", _npz(x=rng.integers(-128, 128, (3, 8)).astype(np.int8), ids=np.array([0, 3, 9], np.int32))),
        (2, ".npy", _npy(rng.random((1, 1, 4, 4)).astype(np.float32))),
        (2, ".npy", _npy(np.asfortranarray(rng.integers(-5, 5, (1, 1, 4, 4))))),
        (3, ".txt", b"hello a b\nb b a hello a b c d e f\n\n"),
    ]


# --- targets --------------------------------------------------------------------------------------


class Targets:
    def __init__(self):
        import refsim

        self.refsim = refsim
        self.intq = intq_seeds()
        self.models = [refsim.Model(refsim.intq.from_buffer(d, f"seed{i}.intq")) for i, d in enumerate(self.intq)]
        self.onnx = onnx_seeds()
        self.inputs = input_seeds(self.models)

    # corpus entries: first byte = selector, then the file
    def corpus(self, target: str) -> list[bytes]:
        if target == "intq":
            return ([bytes([mode * 16 + i]) + d for i, d in enumerate(self.intq) for mode in (0, 1, 3)]
                    + [bytes([mode * 16 + i]) + bytes([k]) for i in range(len(self.intq)) for mode in (5, 7) for k in range(4)])
        if target == "onnx":
            return [bytes([flags | i]) + m.SerializeToString() for i, m in enumerate(self.onnx) for flags in (0, 0x80, 0xC0)]
        return [bytes([i]) + data for i, (_, _, data) in enumerate(self.inputs)]

    def run_model(self, model, feeds_fn=None):
        feeds = {}
        for t in model.inputs:
            shape = [d if isinstance(d, int) else 2 for d in t.shape]
            if int(np.prod(shape, dtype=object)) > 4096:
                return
            lo, hi = max(t.dtype.lo, -1), min(t.dtype.hi, 1)
            feeds[t.name] = np.random.default_rng(0).integers(lo, hi, size=shape, endpoint=True).astype(t.dtype.storage)
        model.run(feeds)

    def intq_target(self, data: bytes) -> None:
        if not data:
            return
        mode, body = data[0] >> 4, bytearray(data[1:])
        if mode & 4:  # structured: mutate the JSON header of a seed, guided by the bytes
            body = bytearray(mutate_intq_header(self.intq[data[0] % len(self.intq)], random.Random(zlib.crc32(body))))
        if mode % 2 and len(body) >= 64:  # repair the header checksum a mutation broke
            import struct

            header_len = struct.unpack_from("<Q", body, 16)[0]
            if 64 + header_len <= len(body):
                struct.pack_into("<I", body, 40, zlib.crc32(bytes(body[64 : 64 + header_len])))
        graph = self.refsim.intq.from_buffer(bytes(body), "fuzzed.intq", verify=not mode & 2)
        model = self.refsim.Model(graph)
        self.run_model(model)
        path = TMP / f"fuzz-{os.getpid()}.txt"
        path.write_text("1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\nhello a\n")
        try:
            for sample in self.refsim.inputs.load_samples(model, str(path)):
                model.run(sample.feeds)
        finally:
            path.unlink(missing_ok=True)

    def onnx_target(self, data: bytes) -> None:
        import onnx
        from refsim.exporters.importers import import_model

        if not data:
            return
        selector, body = data[0], data[1:]
        fmt = (None, "qdq", "qonnx", "deeploy")[(selector >> 4) & 3]
        requant = "ort" if selector & 0x40 else "dyadic"
        if selector & 0x80:  # structured: mutate the parsed seed, guided by the bytes
            m = onnx.ModelProto()
            m.CopyFrom(self.onnx[selector % len(self.onnx)])
            mutate_model(m, random.Random(zlib.crc32(body)), body)
            source = m
        else:
            path = TMP / f"fuzz-{os.getpid()}.onnx"
            path.write_bytes(body)
            source = str(path)
        try:
            model = import_model(source, fmt=fmt, requant=requant)
        finally:
            if not selector & 0x80:
                path.unlink(missing_ok=True)
        self.run_model(model)

    def inputs_target(self, data: bytes) -> None:
        if not data:
            return
        index, suffix, _ = self.inputs[data[0] % len(self.inputs)]
        model = self.models[index]
        path = TMP / f"fuzz-{os.getpid()}{suffix}"
        path.write_bytes(data[1:])
        try:
            samples = self.refsim.inputs.load_samples(model, str(path))
        finally:
            path.unlink(missing_ok=True)
        for sample in samples[:4]:
            if sum(np.asarray(a).size for a in sample.feeds.values()) <= 1 << 16:
                model.run(sample.feeds)


def mutate_model(m, rng: random.Random, body: bytes) -> None:
    """A few structural mutations of an ONNX model: arity, attributes, tensors, types."""
    from onnx import TensorProto, helper

    nodes = m.graph.node
    inits = m.graph.initializer
    interesting_ints = [0, 1, -1, 2, 3, 8, 31, 32, 64, 255, 2**31, -(2**31), 2**40, 2**62, -(2**63), 2**63 - 1]
    interesting_floats = [0.0, -0.0, 1.0, -1.0, 0.5, float("nan"), float("inf"), float("-inf"), 1e308, 5e-324, 2.0**40]
    for _ in range(1 + rng.randrange(4)):
        kind = rng.randrange(12)
        if nodes and kind == 0:  # drop an input
            n = rng.choice(nodes)
            if n.input:
                del n.input[rng.randrange(len(n.input))]
        elif nodes and kind == 1:  # add or blank an input
            n = rng.choice(nodes)
            names = [i.name for i in inits] + [o for x in nodes for o in x.output] + [""]
            n.input.insert(rng.randrange(len(n.input) + 1), rng.choice(names))
        elif nodes and kind == 2:  # drop an attribute
            n = rng.choice(nodes)
            if n.attribute:
                del n.attribute[rng.randrange(len(n.attribute))]
        elif nodes and kind == 3:  # change an attribute's value (or type)
            n = rng.choice(nodes)
            if n.attribute:
                a = rng.choice(n.attribute)
                name = a.name
                choice = rng.randrange(5)
                n.attribute.remove(a)
                if choice == 0:
                    n.attribute.append(helper.make_attribute(name, rng.choice(interesting_ints)))
                elif choice == 1:
                    n.attribute.append(helper.make_attribute(name, rng.choice(interesting_floats)))
                elif choice == 2:
                    n.attribute.append(helper.make_attribute(name, [rng.choice(interesting_ints) for _ in range(1 + rng.randrange(6))]))
                elif choice == 3:
                    n.attribute.append(helper.make_attribute(name, rng.choice(["", "ROUND", "constant", "reflect", "x" * 50])))
                else:
                    t = helper.make_tensor(name, TensorProto.FLOAT, [1], [rng.choice(interesting_floats)])
                    n.attribute.append(helper.make_attribute(name, t))
        elif nodes and kind == 4:  # change an op type or domain
            n = rng.choice(nodes)
            if rng.random() < 0.5:
                n.op_type = rng.choice([x.op_type for x in nodes] + ["Pad", "Expand", "Tile", "ConstantOfShape", "Resize",
                                                                      "Range", "MatMul", "Reshape", "Slice", "Gemm", "Conv"])
            else:
                n.domain = rng.choice(["", "qonnx.custom_op.general", "PACTOps", "com.microsoft", "ai.onnx"])
        elif inits and kind == 5:  # change an initializer's values to extremes
            t = rng.choice(inits)
            try:
                array = onnx_to_numpy(t)
            except Exception:
                continue
            if array.size:
                flat = array.reshape(-1).copy()
                if flat.dtype.kind == "f":
                    flat[rng.randrange(flat.size)] = rng.choice(interesting_floats)
                elif flat.dtype.kind in "iu":
                    info = np.iinfo(flat.dtype)
                    flat[rng.randrange(flat.size)] = rng.choice([v for v in interesting_ints if info.min <= v <= info.max])
                t.CopyFrom(numpy_from_array(flat.reshape(array.shape), t.name))
        elif inits and kind == 6:  # break an initializer's data: dims, type, raw bytes
            t = rng.choice(inits)
            what = rng.randrange(4)
            if what == 0 and t.dims:
                t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 1, 3, 2**20, 2**31, -1])
            elif what == 1:
                t.data_type = rng.choice([0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 14, 16, 21, 22, 25, 26, 100])
            elif what == 2 and t.raw_data:
                t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data) + 1)] + body[:8]
            else:
                t.dims.append(rng.choice([1, 2, 7]))
        elif kind == 7:  # change a graph input's shape or type
            if m.graph.input:
                vi = rng.choice(m.graph.input)
                tt = vi.type.tensor_type
                if rng.random() < 0.5 and tt.shape.dim:
                    d = tt.shape.dim[rng.randrange(len(tt.shape.dim))]
                    if rng.random() < 0.5:
                        d.dim_value = rng.choice([0, 1, 3, 2**20, 2**40])
                    else:
                        d.dim_param = "n"
                else:
                    tt.elem_type = rng.choice([0, 1, 2, 3, 6, 7, 9, 10, 16])
        elif nodes and kind == 8:  # drop or duplicate a node
            i = rng.randrange(len(nodes))
            if rng.random() < 0.5:
                del nodes[i]
            else:
                nodes.insert(i, nodes[i])
        elif kind == 9:  # change the opset
            for o in m.opset_import:
                if o.domain in ("", "ai.onnx") and rng.random() < 0.5:
                    o.version = rng.choice([1, 7, 10, 11, 13, 17, 21, 23, 99])
        elif nodes and kind == 10:  # drop an output
            n = rng.choice(nodes)
            if n.output:
                del n.output[rng.randrange(len(n.output))]
        elif inits and kind == 11:  # an initializer becomes a shape-like constant with huge values
            t = rng.choice(inits)
            values = [rng.choice(interesting_ints) for _ in range(rng.randrange(1, 5))]
            t.CopyFrom(numpy_from_array(np.array(values, np.int64), t.name))


INTERESTING_JSON = [0, 1, -1, 2, 3, 7, 8, 63, 64, 2**31, 2**63 - 1, -(2**63), 2**64, 2**80, 1e308, -1e308, 0.5,
                    float("nan"), float("inf"), True, False, None, "", "int8", "ternary", "batch", "x", [], {}, [0], [2**70],
                    ["a", 1], {"x": 1}]


def mutate_intq_header(file: bytes, rng: random.Random) -> bytes:
    """A seed with 1-4 values of its JSON header replaced (the checksum is fixed by the caller)."""
    import struct

    header_len, data_offset = struct.unpack_from("<QQ", file, 16)
    header = json.loads(file[64 : 64 + header_len])
    for _ in range(1 + rng.randrange(4)):
        paths = []

        def walk(value, path):
            paths.append(path)
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
            for key, child in items:
                walk(child, path + (key,))

        walk(header, ())
        path = rng.choice(paths[1:])
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = rng.randrange(5)
        if action == 0 and isinstance(parent, dict):
            del parent[key]
        elif action == 1 and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif action == 2 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] += rng.choice([-1, 1, 64, -64, 2**32])
        else:
            parent[key] = copy.deepcopy(rng.choice(INTERESTING_JSON))
    text = json.dumps(header).encode()
    offset = (64 + len(text) + 63) // 64 * 64
    section = file[data_offset:]
    pre = struct.pack("<8sIIQQQI20x", b"INTQ\r\n\x1a\n", 1, 0, len(text), offset, len(section), zlib.crc32(text))
    return pre + text + bytes(offset - 64 - len(text)) + section


def onnx_to_numpy(t):
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


def numpy_from_array(a, name):
    from onnx import numpy_helper

    return numpy_helper.from_array(a, name)


# --- the driver ------------------------------------------------------------------------------------

# What one input may make the process grow by: issue 17's goal (no file under 1 MB makes
# refsim allocate more than 1 GB). Checked here rather than with libFuzzer's -rss_limit_mb,
# which reads ru_maxrss, and that a child inherits from the process that started it.
MEMORY_LIMIT_MIB = int(os.environ.get("FUZZ_MEMORY_LIMIT_MIB", 1024))


def peak_rss_mib() -> int:
    """This process's peak resident memory since it started (VmHWM; reset by exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) >> 10
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10


class Campaign:
    """Runs one target, classifies what it raises, and reports at the end."""

    def __init__(self, target: str, log: str | None):
        self.targets = Targets()
        self.fn = getattr(self.targets, f"{target}_target")
        self.target = target
        self.log = open(log, "a") if log else None
        self.execs = 0
        self.refsim_errors = 0
        self.kinds: Counter = Counter()
        self.start = time.time()
        self.baseline = self.peak = peak_rss_mib()
        self.over_limit = False

    def one(self, data: bytes) -> None:
        from refsim.errors import RefsimError

        self.execs += 1
        try:
            self.fn(data)
        except RefsimError as e:
            self.refsim_errors += 1
            text = str(e)
            if not text or "\n" in text:
                self._defect(AssertionError(f"RefsimError message is not one line: {text!r}"), data)
        except Exception as e:  # anything else is a defect
            self._defect(e, data)
        peak = peak_rss_mib()
        if peak > self.peak + 64 and self.log is not None:  # an input that raised the peak noticeably: keep it
            self.log.write(json.dumps({"target": self.target, "kind": "peak", "message": f"{peak} MiB",
                                       "input": data[:65536].hex()}) + "\n")
            self.log.flush()
        self.peak = max(self.peak, peak)
        if peak - self.baseline > MEMORY_LIMIT_MIB and not self.over_limit:
            self.over_limit = True
            self._defect(MemoryError(f"peak memory grew by {peak - self.baseline} MiB, past {MEMORY_LIMIT_MIB} MiB"), data)

    def _defect(self, e: BaseException, data: bytes) -> None:
        frames = traceback.extract_tb(e.__traceback__)
        ours = [f for f in frames if "/ref/" in f.filename or "/exporters/" in f.filename or "/golden/" in f.filename]
        where = ours[-1] if ours else (frames[-1] if frames else None)
        kind = f"{type(e).__name__} at {Path(where.filename).name}:{where.lineno}" if where else type(e).__name__
        self.kinds[kind] += 1
        if self.log is None:
            raise e
        if self.kinds[kind] == 1:
            self.log.write(json.dumps({"target": self.target, "kind": kind, "message": str(e)[:300],
                                       "trace": traceback.format_exception(e)[-6:], "input": data[:65536].hex()}) + "\n")
            self.log.flush()

    def report(self) -> str:
        defects = sum(self.kinds.values())
        lines = [f"fuzz {self.target}: {self.execs} executions in {time.time() - self.start:.0f} s, "
                 f"{self.refsim_errors} RefsimErrors, {defects} non-refsim exceptions "
                 f"({len(self.kinds)} kinds), peak RSS {self.peak} MiB ({self.baseline} MiB before the first input)"]
        lines += [f"  {count:6d}  {kind}" for kind, count in self.kinds.most_common()]
        return "\n".join(lines)


def plain_mutations(corpus: list[bytes], runs: int, seed: int):
    """Without atheris: byte flips, inserts, deletes, interesting values and splices."""
    rng = random.Random(seed)
    for i in range(runs):
        data = bytearray(rng.choice(corpus))
        for _ in range(1 + rng.randrange(8)):
            if not data:
                break
            kind = rng.randrange(6)
            pos = rng.randrange(len(data))
            if kind == 0:
                data[pos] ^= 1 << rng.randrange(8)
            elif kind == 1:
                data[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, ord("9"), ord("-"), ord("{"), ord(",")])
            elif kind == 2:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
            elif kind == 3:
                del data[pos : pos + rng.randrange(1, 17)]
            elif kind == 4:
                other = rng.choice(corpus)
                start = rng.randrange(len(other))
                data[pos : pos + rng.randrange(1, 64)] = other[start : start + rng.randrange(1, 64)]
            else:
                del data[pos:]
        if i % 7 == 0:  # keep the selector byte sometimes, so every seed keeps being reached
            data[:1] = bytes([rng.randrange(256)])
        yield bytes(data)


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else ""
    if target not in ("intq", "onnx", "inputs"):
        print(__doc__)
        return 2
    rest = argv[2:]
    log = os.environ.get("FUZZ_LOG")
    plain = "--plain" in rest
    try:
        import atheris
    except ImportError:
        atheris, plain = None, True
    if plain:
        runs = int(rest[rest.index("--runs") + 1]) if "--runs" in rest else 1000
        seed = int(rest[rest.index("--seed") + 1]) if "--seed" in rest else 0
        campaign = Campaign(target, log)
        for data in plain_mutations(campaign.targets.corpus(target), runs, seed):
            campaign.one(data)
        print(campaign.report())
        return 1 if campaign.kinds else 0
    import refsim.kernels  # noqa: F401  (Numba compiles these: they must not be instrumented)
    import refsim.ops  # noqa: F401

    with atheris.instrument_imports(include=["refsim"]):
        import refsim.exporters.importers  # noqa: F401
        import refsim.inputs  # noqa: F401
        import refsim.intq  # noqa: F401
        import refsim.npyfile  # noqa: F401
        import refsim.text  # noqa: F401
    campaign = Campaign(target, log)
    corpus_dir = Path(tempfile.mkdtemp(prefix=f"refsim-fuzz-{target}-", dir=TMP))
    for i, entry in enumerate(campaign.targets.corpus(target)):
        (corpus_dir / f"seed{i}").write_bytes(entry)
    import atexit
    import shutil

    def finish():
        print(campaign.report(), flush=True)
        shutil.rmtree(corpus_dir, ignore_errors=True)

    atexit.register(finish)
    # libFuzzer ends a -max_total_time run with C's exit(), which runs no Python atexit
    # handler: the campaign keeps the time itself, so its report is printed either way.
    for arg in [a for a in rest if a.startswith("-max_total_time=")]:
        rest.remove(arg)
        deadline = time.time() + float(arg.split("=", 1)[1])
        one = campaign.one

        def timed(data: bytes, one=one, deadline=deadline) -> None:
            one(data)
            if time.time() > deadline:
                finish()
                sys.stdout.flush()
                os._exit(1 if campaign.kinds else 0)

        campaign.one = timed
    args = [argv[0], *rest, str(corpus_dir)]
    if not any(a.startswith("-max_len") for a in rest):
        args.insert(1, "-max_len=65536")
    if not any(a.startswith("-rss_limit_mb") for a in rest):
        args.insert(1, "-rss_limit_mb=0")  # see MEMORY_LIMIT_MIB
    atheris.Setup(args, campaign.one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
