"""onnx's own conformance cases for the integer ops, through `import_model` and the engine.

`onnx.backend.test.loader.load_model_tests(kind="node")` builds every node test case in
memory (the wheel no longer ships the files). Each case below is imported, run by the
refsim engine, and must give the expected outputs exactly, with both requantization
choices. Graph inputs that are really parameters (scales, zero points, QLinearConv's
weights) are bound as constants; float inputs are quantized and float outputs
dequantized on the host by `quantize_inputs`/`dequantize_outputs` (ONNX's
QuantizeLinear/DequantizeLinear formulas), the integers in between by the engine.

The float8/float4 variants of QuantizeLinear/DequantizeLinear are left out: those are
float types, not integers, and refsim refuses them with a clear error (tested below).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import pytest
from refsim.exporters.frontend.graph import to_numpy
from refsim.exporters.importers import ImportFailure, dequantize_outputs, import_model, quantize_inputs

CASES = [
    "test_quantizelinear", "test_quantizelinear_axis", "test_quantizelinear_uint16", "test_quantizelinear_int16",
    "test_quantizelinear_uint4", "test_quantizelinear_int4", "test_quantizelinear_uint2", "test_quantizelinear_int2",
    "test_quantizelinear_blocked_asymmetric", "test_quantizelinear_blocked_symmetric",
    "test_dequantizelinear", "test_dequantizelinear_axis", "test_dequantizelinear_uint16", "test_dequantizelinear_int16",
    "test_dequantizelinear_uint4", "test_dequantizelinear_int4", "test_dequantizelinear_uint2", "test_dequantizelinear_int2",
    "test_dequantizelinear_blocked",
    "test_qlinearmatmul_2D_uint8_float32", "test_qlinearmatmul_3D_uint8_float32", "test_qlinearmatmul_2D_uint8_float16",
    "test_qlinearmatmul_3D_uint8_float16", "test_qlinearmatmul_2D_int8_float32", "test_qlinearmatmul_3D_int8_float32",
    "test_qlinearmatmul_2D_int8_float16", "test_qlinearmatmul_3D_int8_float16",
    "test_matmulinteger", "test_convinteger_without_padding", "test_convinteger_with_padding", "test_qlinearconv",
]
FLOAT_FORMAT_CASES = re.compile(r"e4m3|e5m2|float4")
INTEGER_OP_CASES = re.compile(r"test_(quantizelinear|dequantizelinear|qlinearmatmul|matmulinteger|convinteger|qlinearconv)")
DATA_INPUTS = {"x", "a", "b", "A", "B"}  # everything else is a parameter: bound as a constant


@pytest.fixture(scope="module")
def node_cases():
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {t.name: t for t in load_model_tests(kind="node")}


def _arrays(values):
    return [to_numpy(v) if isinstance(v, onnx.TensorProto) else np.asarray(v) for v in values]


def test_every_integer_case_of_the_installed_onnx_is_covered(node_cases):
    found = {name for name in node_cases if INTEGER_OP_CASES.match(name) and not FLOAT_FORMAT_CASES.search(name)}
    assert found == set(CASES)


@pytest.mark.parametrize("requant", ["ort", "dyadic"])
@pytest.mark.parametrize("name", CASES)
def test_conformance_case_is_exact(node_cases, name, requant):
    case = node_cases[name]
    names = [i.name for i in case.model.graph.input]
    assert case.data_sets
    for inputs, expected in case.data_sets:
        inputs, expected = _arrays(inputs), _arrays(expected)
        constants = {n: v for n, v in zip(names, inputs) if n not in DATA_INPUTS}
        model = import_model(case.model, requant=requant, constants=constants)
        feeds = quantize_inputs(model, {n: v for n, v in zip(names, inputs) if n in DATA_INPUTS})
        got = dequantize_outputs(model, model.run(feeds))
        for output, want in zip(case.model.graph.output, expected):
            assert got[output.name].shape == want.shape
            np.testing.assert_array_equal(got[output.name].astype(np.float64), want.astype(np.float64))


def test_float8_is_refused_with_a_reason(node_cases):
    case = node_cases["test_dequantizelinear_e4m3fn"]
    with pytest.raises(ImportFailure, match="FLOAT8E4M3FN"):
        import_model(case.model, constants={"x_scale": np.float32(2.0)})
