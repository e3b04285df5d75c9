"""C target: a generated header compiles with gcc, and a program printing its arrays prints the golden tensors."""

import shutil
import subprocess

import numpy as np
import pytest
from golden_helpers import nasty_graph
from refsim import GraphBuilder
from refsim.dtypes import TYPES, pack
from refsim.golden.vectorset import write_vector_set
from refsim.hw_vectors import targets
from refsim.inputs import Sample

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

TYPE_NAMES = ["int2", "uint2", "ternary", "int4", "uint4", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64"]


def model_and_feeds():
    """One input per type (holding both extremes) passed through Clip, plus a per-channel Requant."""
    rng = np.random.default_rng(3)
    b = GraphBuilder("c_types")
    feeds = {}
    for name in TYPE_NAMES:
        t = TYPES[name]
        x = b.input(f"in_{name}", name, [2, 5])
        b.output(b.node("Clip", [x], outputs=f"out_{name}", name=f"clip_{name}"))
        values = rng.integers(t.lo, t.hi, (2, 5), endpoint=True)
        values[0, 0], values[1, 4] = t.lo, t.hi
        feeds[f"in_{name}"] = values.astype(t.storage)
    acc = b.input("acc", "int32", [2, 3])
    mul = b.const([3, 5, 7], "int16", name="rq_mul")
    shift = b.const(2, "uint8", name="rq_shift")
    b.output(b.node("Requant", [acc, mul, shift, None, b.const(-1, "int8")], outputs="requantized", name="rq", dtype="int8"))
    feeds["acc"] = np.array([[1, 2, 3], [-100, 50, 7]], np.int32)
    return b.model(), feeds


def compile_and_run(tmp_path, header, body):
    src = tmp_path / "main.c"
    src.write_text(f'#include <stdio.h>\n#include "{header}"\nint main(void) {{\n{body}\nreturn 0;\n}}\n')
    exe = tmp_path / "main"
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-Wno-unused-variable", "-Wno-unused-const-variable",
                    "-I", str(header.parent), "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def print_array(ident, size_macro):
    return (f'printf("{ident}"); for (long i = 0; i < {size_macro}; i++) printf(" %lld", (long long){ident}[i]); '
            f'printf("\\n");')


def parse(stdout):
    return {line.split()[0]: [int(v) for v in line.split()[1:]] for line in stdout.splitlines()}


def test_header_values_equal_the_golden_tensors(tmp_path):
    model, feeds = model_and_feeds()
    out = tmp_path / "set"
    write_vector_set(model, [Sample(feeds, "s")], out, targets("c"))
    header = out / "sample0000" / "golden_sample0000.h"
    names = [f"in_{n}" for n in TYPE_NAMES] + [f"out_{n}" for n in TYPE_NAMES] + ["acc", "requantized", "rq_mul"]
    lines = [print_array(n, f"{n.upper()}_SIZE") for n in names[:-1]] + [print_array("requantized_rq_mul", "3")]
    lines.append('printf("defines %d %d %d %d %d %d\\n", REQUANTIZED_RQ_SHIFT, REQUANTIZED_RQ_OFFSET, REQUANTIZED_RQ_LO, '
                 'REQUANTIZED_RQ_HI, OUT_INT8_NDIM, OUT_INT8_DIM1);')
    printed = parse(compile_and_run(tmp_path, header, "\n".join(lines)))
    traced = {}
    model.run(feeds, trace=lambda node, name, a: traced.__setitem__(name, a))
    for name in names[:-1]:
        expected = feeds[name] if name in feeds else traced[name]
        assert printed[name] == expected.reshape(-1).astype(np.int64).tolist(), name
    assert printed["requantized_rq_mul"] == [3, 5, 7]
    assert printed["defines"] == [2, -1, -128, 127, 2, 5]
    # Sanity of the source of truth: Requant by hand, (x*mul + 2) >> 2 then -1.
    assert printed["requantized"] == [((1 * 3 + 2) >> 2) - 1, ((2 * 5 + 2) >> 2) - 1, ((3 * 7 + 2) >> 2) - 1,
                                      ((-100 * 3 + 2) >> 2) - 1, ((50 * 5 + 2) >> 2) - 1, ((7 * 7 + 2) >> 2) - 1]


def test_packed_sub_byte_arrays(tmp_path):
    model, feeds = model_and_feeds()
    out = tmp_path / "set"
    write_vector_set(model, [Sample(feeds, "s")], out, targets("c"), {"c_packed": True})
    header = out / "sample0000" / "golden_sample0000.h"
    sub_byte = ["int2", "uint2", "ternary", "int4", "uint4"]
    body = [print_array(f"in_{n}_packed", f"IN_{n.upper()}_PACKED_BYTES") for n in sub_byte]
    body.append(print_array("in_int8", "IN_INT8_SIZE"))  # byte-sized types stay as they were
    printed = parse(compile_and_run(tmp_path, header, "\n".join(body)))
    for n in sub_byte:
        assert printed[f"in_{n}_packed"] == list(pack(feeds[f"in_{n}"], TYPES[n])), n
    # 10 int4 values take 5 bytes; 10 int2 values take 3 bytes, the last one half padding.
    assert len(printed["in_int4_packed"]) == 5 and len(printed["in_int2_packed"]) == 3
    # Element 0 (-8 = 0b1000) is the low nibble of byte 0; element 9 (7) the high nibble of byte 4.
    assert printed["in_int4_packed"][0] & 0xF == 0x8 and printed["in_int4_packed"][4] >> 4 == 0x7
    # int2: element 0 (-2 = 0b10) in bits 0-1 of byte 0; element 9 (1) in bits 2-3 of byte 2, bits 4-7 zero.
    assert printed["in_int2_packed"][0] & 0x3 == 0b10 and printed["in_int2_packed"][2] >> 2 == 0b01
    assert printed["in_int8"] == feeds["in_int8"].reshape(-1).tolist()


def test_unsafe_names_give_a_valid_header(tmp_path):
    model = nasty_graph()
    out = tmp_path / "set"
    write_vector_set(model, [Sample({"in/../../x": np.array([3, -4], np.int8)}, "s */")], out, targets("c"))
    header = out / "sample0000" / "golden_sample0000.h"
    text = header.read_text()
    assert "*/ int evil" not in text and "/*\"" not in text  # the name stays inside its comment
    # Every identifier is distinct and valid: the header compiles (twice included: the guard works).
    stdout = compile_and_run(tmp_path, header, '#include "golden_sample0000.h"\nprintf("%d\\n", (int)T_9LIVES_SIZE);')
    assert stdout.strip() == "2"
