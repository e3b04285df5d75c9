"""Issue 17's ONNX importer reproducers: each malformed model is one ImportFailure naming the
node (exit 2 and one line from `refsim import`), never a traceback; sizes that attributes
drive are bounded before anything is allocated; refsim's own bugs stay distinguishable."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from refsim.cli import main as cli_main
from refsim.errors import InternalError, internal_error
from refsim.exporters.importers import ImportFailure, import_model

F, I8 = TensorProto.FLOAT, TensorProto.INT8
QONNX = "qonnx.custom_op.general"


def model(nodes, inits=(), inputs=(("x", F, [2, 4]),), outputs=("y",), opsets=(("", 17),)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in outputs],
                              initializer=list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 9
    return m


def init(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


Q = [init("s", 0.1), init("z", 0, np.int8)]


def quantize(x="x", out="xq"):
    return helper.make_node("QuantizeLinear", [x, "s", "z"], [out], name=f"q_{out}")


def refused(m, match, fmt=None):
    with pytest.raises(ImportFailure) as info:
        import_model(m, fmt=fmt)
    text = str(info.value)
    assert "\n" not in text and match in text, text
    return text


# --- tensors whose data does not match their declaration --------------------------------------


def test_an_initializer_a_byte_short():
    # was: ValueError: cannot reshape array of size 127 into shape (16,8)
    w = numpy_helper.from_array(np.zeros((16, 8), np.int8), "w")
    w.raw_data = w.raw_data[:-1]
    m = model([quantize(), helper.make_node("MatMulInteger", ["xq", "w"], ["y"], name="mm")], [*Q, w],
              inputs=(("x", F, [2, 16]),))
    refused(m, "initializer 'w': its data does not match type INT8 and dims [16, 8]")


@pytest.mark.parametrize("data_type", [0, TensorProto.STRING, 99])
def test_an_initializer_of_no_number_type(data_type):
    # data_type=0 was: TypeError: The element type in the input tensor is UNDEFINED.
    w = numpy_helper.from_array(np.zeros((4, 2), np.int8), "w")
    w.data_type = data_type
    m = model([quantize(), helper.make_node("MatMulInteger", ["xq", "w"], ["y"], name="mm")], [*Q, w])
    refused(m, "initializer 'w': element type")


def test_bad_raw_data_in_a_constant_node():
    value = numpy_helper.from_array(np.zeros(3, np.float32), "v")
    value.raw_data = b"\x01\x02"
    m = model([helper.make_node("Constant", [], ["c"], name="const", value=value), quantize("c", "y")], Q)
    refused(m, "node 'const' (Constant): does not match ONNX's definition of Constant: TensorProto (tensor name: v) raw_data size")


# --- arity and attributes, from each op's schema ----------------------------------------------


ARITY = {  # op: (inputs of the malformed node, extra initializers)
    "MatMul": (["xd"], []),
    "Reshape": (["xq"], []),
    "Slice": (["xq", "i"], [init("i", [0], np.int64)]),
    "Gemm": (["xd"], []),
    "QuantizeLinear": (["xd"], []),
    "Conv": (["xd"], []),
    "QLinearMatMul": (["xq", "s", "z", "xq", "s"], []),
}


@pytest.mark.parametrize("op", sorted(ARITY))
def test_too_few_inputs(op):
    # was: IndexError: list index out of range, from the handler
    ins, extra = ARITY[op]
    nodes = [quantize(), helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node(op, ins, ["y"], name="bad")]
    refused(model(nodes, [*Q, *extra]), f"node 'bad' ({op}): does not match ONNX's definition of {op}")


def test_trunc_with_too_few_inputs():
    nodes = [helper.make_node("Quant", ["x", "s", "zf", "b8"], ["xq"], domain=QONNX, name="xq"),
             helper.make_node("Trunc", ["xq", "s", "zf"], ["y"], domain=QONNX, name="trunc")]
    inits = [init("s", 0.25), init("zf", 0.0), init("b8", 8.0)]
    refused(model(nodes, inits, opsets=(("", 13), (QONNX, 1))), "node 'trunc' (qonnx.custom_op.general.Trunc): takes 5 or 7 inputs, got 3")


@pytest.mark.parametrize("op, attr", [("Concat", "axis"), ("Cast", "to")])
def test_a_missing_required_attribute(op, attr):
    # was: KeyError
    node = helper.make_node(op, ["xq", "xq"] if op == "Concat" else ["xq"], ["y"], name="bad")
    refused(model([quantize(), node], Q), f"Required attribute '{attr}' is missing")


def test_an_attribute_of_the_wrong_type():
    node = helper.make_node("Cast", ["xq"], ["y"], name="bad", to=1.5)
    refused(model([quantize(), node], Q), "Mismatched attribute type")


@pytest.mark.parametrize("bits", [float("nan"), float("inf"), -float("inf"), 2.0**31, 0.5])
def test_qonnx_quant_with_a_bit_width_that_is_not_one(bits):
    # NaN was: ValueError: cannot convert float NaN to integer (round() ran before the range
    # check); +inf: OverflowError
    nodes = [helper.make_node("Quant", ["x", "s", "zf", "bits"], ["y"], domain=QONNX, name="quant")]
    inits = [init("s", 0.25), init("zf", 0.0), init("bits", bits)]
    refused(model(nodes, inits, opsets=(("", 13), (QONNX, 1))), "the bit width must be one integer from 1 to 32")


def test_qonnx_trunc_with_a_huge_output_bit_width_allocates_nothing():
    # a 2^31-bit output width made int_range build a 256 MB Python integer
    nodes = [helper.make_node("Quant", ["x", "s", "zf", "b8"], ["xq"], domain=QONNX, name="xq"),
             helper.make_node("Trunc", ["xq", "s", "zf", "b8", "s2", "zf", "huge"], ["y"], domain=QONNX, name="trunc")]
    inits = [init("s", 0.25), init("zf", 0.0), init("b8", 8.0), init("s2", 0.5), init("huge", 2.0**31)]
    refused(model(nodes, inits, opsets=(("", 13), (QONNX, 1))), "the output bit width must be one integer")


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 2.5])
def test_deeploy_integer_attributes_that_are_not_integers(value):
    # an infinite value in an integer attribute was: OverflowError
    node = helper.make_node("RequantShift", ["x", "mul", "add"], ["y"], name="rqs", n_levels_out=256, signed=1)
    node.attribute.append(helper.make_attribute("div", numpy_helper.from_array(np.array([value], np.float32))))
    m = model([node], [init("mul", [3]), init("add", [1])], inputs=(("x", F, [1, 4]),), opsets=(("", 13),))
    refused(m, "node 'rqs' (RequantShift): attribute 'div' must hold one integer", fmt="deeploy")


def test_deeploy_ops_check_their_arity():
    node = helper.make_node("iLayerNorm", ["x"], ["y"], name="ln", D=256)
    refused(model([node], inputs=(("x", F, [1, 4]),), opsets=(("", 13),)), "takes 3 inputs, got 1", fmt="deeploy")


def test_strings_that_are_not_utf8():
    m = model([quantize(), helper.make_node("Relu", ["xq"], ["y"], name="r")], Q)
    data = m.SerializeToString().replace(b"Relu", b"R\xfflu")
    refused(onnx.load_from_string(data), "an op type in the model is not UTF-8 text")


# --- sizes that attributes drive --------------------------------------------------------------


def pad_model(pad: int):
    """The issue's 448-byte model: a QDQ tensor padded by `pad` along its last axis."""
    nodes = [quantize(), helper.make_node("Pad", ["xq", "pads"], ["y"], name="pad", mode="constant")]
    return model(nodes, [*Q, init("pads", [0, 0, 0, pad], np.int64)], inputs=(("x", F, [1, 4]),))


@pytest.mark.parametrize("pad", [2**31, 2**40])
def test_a_tiny_model_padding_by_gigabytes_is_refused_at_import(pad):
    # 2^31 allocated 2.3 GB; 2^40 let a MemoryError escape as a traceback
    assert pad_model(pad).ByteSize() < 1000
    refused(pad_model(pad), "node 'pad' (Pad)")


FOLDS = {  # op on constants whose result size comes from a value: inputs, initializers
    "ConstantOfShape": (["shape"], [init("shape", [1 << 20, 1 << 20], np.int64)]),
    "Expand": (["one", "shape"], [init("one", [1.0]), init("shape", [1 << 20, 1 << 20], np.int64)]),
    "Tile": (["one2", "reps"], [init("one2", [[1.0]]), init("reps", [1 << 20, 1 << 20], np.int64)]),
    "Range": (["r0", "r1", "r2"], [init("r0", 0, np.int64), init("r1", 1 << 40, np.int64), init("r2", 1, np.int64)]),
    "Resize": (["img", "", "scales"], [init("img", np.zeros((1, 1, 2, 2))), init("scales", [1, 1, 1e6, 1e6])]),
    "Pad": (["img", "pads"], [init("img", np.zeros((1, 1, 2, 2))), init("pads", [0, 0, 0, 0, 0, 0, 1 << 20, 1 << 20], np.int64)]),
}


@pytest.mark.parametrize("op", sorted(FOLDS))
def test_folding_a_constant_is_bounded_before_it_is_evaluated(op):
    ins, inits = FOLDS[op]
    nodes = [helper.make_node(op, ins, ["big"], name="big"), helper.make_node("Shape", ["big"], ["bs"], name="shape_of"),
             quantize(), helper.make_node("Relu", ["xq"], ["y"], name="r")]
    refused(model(nodes, [*Q, *inits]), "beyond what this model may allocate")


def test_a_fold_whose_size_inference_cannot_tell_is_refused():
    # Range takes scalars; given 1-element vectors onnx's evaluator still ran it (16 GB)
    inits = [init("r0", [0], np.int64), init("r1", [1 << 31], np.int64), init("r2", [1], np.int64)]
    nodes = [helper.make_node("Range", ["r0", "r1", "r2"], ["big"], name="range"), quantize(),
             helper.make_node("Relu", ["xq"], ["y"], name="r")]
    refused(model(nodes, [*Q, *inits]), "node 'range' (Range): onnx's shape inference cannot tell the size")


def test_peak_memory_of_importing_the_pad_model_stays_small(tmp_path):
    path = tmp_path / "pad.onnx"
    onnx.save(pad_model(2**31), path)
    code = (
        "import resource, sys\n"
        "from refsim.exporters.importers import ImportFailure, import_model\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"try:\n    import_model({str(path)!r})\nexcept ImportFailure:\n    pass\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown < 100, f"importing grew the peak memory by {grown} MiB"


# --- the CLI, and refsim's own bugs -------------------------------------------------------------


def test_refsim_import_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "bad.onnx"
    onnx.save(pad_model(2**40), path)
    assert cli_main(["import", str(path), "-o", str(tmp_path / "out.intq")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refsim: error: node 'pad' (Pad)") and err.count("\n") == 1
    assert not (tmp_path / "out.intq").exists()


def relu_model():
    return model([quantize(), helper.make_node("Relu", ["xq"], ["y"], name="relu")], Q)


def test_an_unexpected_exception_in_a_handler_names_the_node(monkeypatch):
    from refsim.exporters.importers.qdq import QdqImporter

    def broken(self, node, ins, attrs):
        return {}["missing"]

    monkeypatch.setattr(QdqImporter, "op_Relu", broken, raising=False)
    monkeypatch.setattr(QdqImporter, "unhandled", broken)
    with pytest.raises(ImportFailure, match=r"node 'relu' \(Relu\): cannot be imported \(KeyError: 'missing'\)") as info:
        import_model(relu_model())
    assert isinstance(info.value.__cause__, KeyError)  # kept for whoever debugs it


def test_refsim_bugs_stay_distinguishable(monkeypatch, tmp_path):
    from refsim.exporters.importers.qdq import QdqImporter

    def buggy(self, node, ins, attrs):
        raise internal_error("a handler lost track of its values")

    monkeypatch.setattr(QdqImporter, "unhandled", buggy)
    with pytest.raises(InternalError, match="refsim bug: a handler lost track of its values; please report"):
        import_model(relu_model())
    assert not issubclass(InternalError, ImportFailure)


# --- export reads its float models through the same checks ------------------------------------


def float_model(nodes, inits=()):
    return model(nodes, inits, inputs=(("x", F, [1, 4]),), opsets=(("", 20),))


@pytest.mark.parametrize("case", ["one-input MatMul", "initializer a byte short", "Cast without to"])
def test_export_refuses_the_same_malformed_nodes(tmp_path, capsys, case):
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    if case == "one-input MatMul":
        nodes = [helper.make_node("MatMul", ["x"], ["y"], name="mm")]
    elif case == "initializer a byte short":
        w.raw_data = w.raw_data[:-1]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    else:
        nodes = [helper.make_node("Cast", ["x"], ["y"], name="cast")]
    path = tmp_path / "float.onnx"
    onnx.save(float_model(nodes, [w]), path)
    np.save(tmp_path / "calib.npy", np.zeros((2, 1, 4), np.float32))
    code = cli_main(["export", str(path), "-o", str(tmp_path / "out.intq"), "--calib", str(tmp_path / "calib.npy")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert ("node 'mm' (MatMul)" in err or "initializer 'w'" in err or "node 'cast' (Cast)" in err), err
    assert not (tmp_path / "out.intq").exists()


def test_pads_on_a_dimension_only_a_run_knows_are_bounded_too():
    # the batch is symbolic, so no declared shape says how large the padded tensor is
    nodes = [quantize(), helper.make_node("Pad", ["xq", "pads"], ["y"], name="pad", mode="constant")]
    m = model(nodes, [*Q, init("pads", [2**31, 0, 0, 0], np.int64)], inputs=(("x", F, ["batch", 68]),))
    refused(m, "node 'pad' (Pad)")


def test_a_reshape_copying_a_dimension_the_input_lacks():
    nodes = [quantize(), helper.make_node("Reshape", ["xq", "shape"], ["y"], name="reshape")]
    refused(model(nodes, [*Q, init("shape", [0, 0, 0], np.int64)]), "node 'reshape' (Reshape)")


def test_an_input_of_no_element_type():
    m = model([quantize(), helper.make_node("Relu", ["xq"], ["y"], name="relu")], Q)
    m.graph.input[0].type.tensor_type.elem_type = 0
    refused(m, "input 'x'")


def test_a_reshape_whose_shape_is_not_integers():
    # was (fuzz campaign): ValueError: cannot convert float NaN to integer, from the shapes
    # of a Reshape on a symbolic batch
    nodes = [quantize(), helper.make_node("Reshape", ["xq", "shape"], ["y"], name="reshape")]
    m = model(nodes, [*Q, init("shape", [np.nan, 4], np.float64)], inputs=(("x", F, ["batch", 4]),))
    refused(m, "node 'reshape' (Reshape): its shape input must be integers")


def test_a_range_of_another_domain_with_two_inputs():
    # was (fuzz campaign): ValueError: not enough values to unpack, from the shape of a
    # Range that onnx's schema check does not cover (its domain is not onnx's)
    nodes = [quantize(), helper.make_node("Range", ["r0", "r1"], ["y"], name="range", domain="PACTOps")]
    m = model(nodes, [*Q, init("r0", 0, np.int64), init("r1", 4, np.int64)], opsets=(("", 17), ("PACTOps", 1)))
    refused(m, "node 'range' (PACTOps.Range)")
