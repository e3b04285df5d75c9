"""Writing small quantized TFLite models with the flatbuffer builders (no TensorFlow), and
running them with LiteRT's reference kernels. Needs `ai-edge-litert` (refsim's `test` extra).

    b = TfliteBuilder()
    x = b.input([2, 8], "int8", scale=0.05, zero_point=3)
    w = b.const(weights, "int8", scale=[0.01] * 4, zero_point=[0] * 4)   # per channel along axis 0
    y = b.tensor([2, 4], "int8", scale=0.1, zero_point=-2)
    b.op("FULLY_CONNECTED", [x, w, -1], [y], FullyConnectedOptionsT(fusedActivationFunction=1))
    b.output(y)
    outputs = run_litert(b.build(), [x_values])

The model is written with LiteRT's own schema classes (`ai_edge_litert.schema_py_generated`,
the object API over `flatbuffers`), read back by refsim with the `tflite` package: two
independent readers of the same schema. `run_litert` uses the BUILTIN_REF op resolver,
LiteRT's reference kernels.
"""

from __future__ import annotations

import ai_edge_litert as litert
import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as S
from ai_edge_litert.interpreter import Interpreter, OpResolverType

TYPES = {"float32": S.TensorType.FLOAT32, "int32": S.TensorType.INT32, "int8": S.TensorType.INT8,
         "int16": S.TensorType.INT16, "int64": S.TensorType.INT64, "uint8": S.TensorType.UINT8}
NUMPY = {"float32": np.float32, "int32": np.int32, "int8": np.int8, "int16": np.int16, "int64": np.int64, "uint8": np.uint8}
LITERT_VERSION = litert.__version__


def options(kind: str, **fields):
    """An options object, for example options("FullyConnected", fusedActivationFunction=1)."""
    obj = getattr(S, f"{kind}OptionsT")()
    for k, v in fields.items():
        if not hasattr(obj, k):
            raise AttributeError(f"{kind}OptionsT has no field {k!r}")
        setattr(obj, k, v)
    return obj


class TfliteBuilder:
    def __init__(self, description: str = "refsim test model"):
        self.tensors: list = []
        self.buffers: list = [S.BufferT()]
        self.operators: list = []
        self.codes: list = []
        self.code_index: dict[int, int] = {}
        self.inputs: list[int] = []
        self.outputs: list[int] = []
        self.description = description

    def tensor(self, shape, dtype: str, scale=None, zero_point=None, data=None, axis: int = 0, name: str | None = None) -> int:
        t = S.TensorT()
        t.shape = [int(d) for d in shape]
        t.type = TYPES[dtype]
        t.name = name or f"t{len(self.tensors)}"
        t.buffer = 0
        if data is not None:
            array = np.ascontiguousarray(np.asarray(data, NUMPY[dtype]).reshape(shape))
            buffer = S.BufferT()
            buffer.data = np.frombuffer(array.tobytes(), np.uint8).tolist()
            self.buffers.append(buffer)
            t.buffer = len(self.buffers) - 1
        if scale is not None:
            q = S.QuantizationParametersT()
            q.scale = [float(s) for s in np.atleast_1d(scale)]
            zp = np.zeros(len(q.scale), np.int64) if zero_point is None else np.atleast_1d(zero_point)
            q.zeroPoint = [int(z) for z in zp]
            q.quantizedDimension = axis
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def input(self, shape, dtype: str, **quant) -> int:
        index = self.tensor(shape, dtype, **quant)
        self.inputs.append(index)
        return index

    def const(self, data, dtype: str, **quant) -> int:
        data = np.asarray(data)
        return self.tensor(data.shape, dtype, data=data, **quant)

    def output(self, *indices: int) -> None:
        self.outputs.extend(indices)

    def op(self, name: str, inputs, outputs, opts=None) -> None:
        code = getattr(S.BuiltinOperator, name)
        if code not in self.code_index:
            oc = S.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = 1
            self.code_index[code] = len(self.codes)
            self.codes.append(oc)
        o = S.OperatorT()
        o.opcodeIndex = self.code_index[code]
        o.inputs = [int(i) for i in inputs]
        o.outputs = [int(i) for i in outputs]
        if opts is not None:
            kind = type(opts).__name__[:-1]  # FullyConnectedOptionsT -> FullyConnectedOptions
            o.builtinOptionsType = getattr(S.BuiltinOptions, kind)
            o.builtinOptions = opts
        self.operators.append(o)

    def build(self) -> bytes:
        sg = S.SubGraphT()
        sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = self.tensors, self.inputs, self.outputs, self.operators, "main"
        m = S.ModelT()
        m.version = 3
        m.subgraphs, m.operatorCodes, m.buffers, m.description = [sg], self.codes, self.buffers, self.description
        fb = flatbuffers.Builder(1024)
        fb.Finish(m.Pack(fb), file_identifier=b"TFL3")
        return bytes(fb.Output())


def run_litert(model: bytes, feeds) -> list[np.ndarray]:
    """Run with LiteRT's reference kernels (OpResolverType.BUILTIN_REF)."""
    it = Interpreter(model_content=model, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    it.allocate_tensors()
    for detail, value in zip(it.get_input_details(), feeds):
        it.set_tensor(detail["index"], np.asarray(value, detail["dtype"]))
    it.invoke()
    return [it.get_tensor(d["index"]).copy() for d in it.get_output_details()]


def extremes_and_random(rng, shape, dtype: str, count: int = 1) -> list[np.ndarray]:
    """Input batches for a quantized tensor: all-minimum, all-maximum, alternating, then random."""
    info = np.iinfo(NUMPY[dtype])
    arrays = [np.full(shape, info.min, NUMPY[dtype]), np.full(shape, info.max, NUMPY[dtype])]
    alt = np.where(np.indices(shape).sum(axis=0) % 2 == 0, info.min, info.max).astype(NUMPY[dtype])
    arrays.append(alt)
    for _ in range(count):
        arrays.append(rng.integers(info.min, int(info.max) + 1, size=shape).astype(NUMPY[dtype]))
    return arrays
