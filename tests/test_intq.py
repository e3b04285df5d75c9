"""The .intq file: round trips for every type, packing as ONNX packs, the C reader of
docs/INTQ.md, memory-mapped loading and atomic saving."""

import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import refsim
from core_strategies import typed_array
from hypothesis import given
from hypothesis import strategies as st
from onnx import numpy_helper
from refsim import GraphBuilder
from refsim.dtypes import TYPES, pack, unpack
from refsim.intq import from_buffer, load_graph, save, to_bytes
from torch_core import TYPES as RANGES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_mlp.intq"
SHAPES = [(0,), (1,), (3,), (5,), (7,), (2, 3), (3, 3), (4, 0, 2), (9,), ()]


def every_type_graph():
    b = GraphBuilder("every_type")
    b.metadata.update({"labels": ["a", "b"], "nested": {"k": [1, 2.5, None, True, "s"]}, "unicode": "µ→∞"})
    b.blobs["tokenizer.json"] = b'{"model": {}}'
    b.blobs["empty"] = b""
    b.blobs["binary"] = bytes(range(256)) * 3
    rng = np.random.default_rng(1)
    consts = []
    for name, t in TYPES.items():
        for i, shape in enumerate(SHAPES):
            values = rng.integers(t.lo, t.hi, size=shape, endpoint=True)
            if values.size:
                values.reshape(-1)[0] = t.lo
                values.reshape(-1)[-1] = t.hi
            consts.append(b.const(values, name, name=f"{name}.{i}", scale=0.5 if i % 2 else [0.25, 0.5], zero_point=0 if i % 2 else [0, 1], quant_axis=None if i % 2 or not shape else 0))
    x = b.input("x", "int8", ["batch", "seq", 4], scale=0.1, zero_point=-3)
    y = b.node("Relu", [x], outputs="y")
    z = b.node("Transpose", [y], outputs="z", perm=[0, 2, 1])
    b.output(z, consts[0])
    return b.build()


def test_round_trip_of_every_type_and_shape(tmp_path):
    graph = every_type_graph()
    path = tmp_path / "m.intq"
    save(graph, path)
    loaded = load_graph(path)
    assert loaded.name == graph.name and loaded.inputs == graph.inputs and loaded.outputs == graph.outputs
    assert loaded.metadata == json.loads(json.dumps(graph.metadata))
    assert loaded.blobs == graph.blobs
    for name, t in graph.tensors.items():
        u = loaded.tensors[name]
        assert (u.dtype, u.shape, u.scale, u.zero_point, u.quant_axis) == (t.dtype, t.shape, t.scale, t.zero_point, t.quant_axis), name
        if t.is_const:
            assert u.data.dtype == t.data.dtype and u.data.shape == t.data.shape and np.array_equal(u.data, t.data), name
    assert [(n.name, n.op, n.inputs, n.outputs, n.attrs) for n in loaded.nodes] == [
        (n.name, n.op, n.inputs, n.outputs, n.attrs) for n in graph.nodes
    ]
    assert loaded.tensors["x"].shape == ("batch", "seq", 4)
    # and the bytes are reproducible: saving the loaded graph gives the same file
    assert to_bytes(loaded) == path.read_bytes()


def test_writer_layout_is_aligned_and_sized(tmp_path):
    data = to_bytes(every_type_graph())
    magic, version, flags, header_len, data_offset, data_len, crc = struct.unpack_from("<8sIIQQQI", data)
    assert (magic, version, flags) == (b"INTQ\r\n\x1a\n", 1, 0)
    assert data_offset % 64 == 0 and data_offset >= 64 + header_len and data_offset + data_len == len(data)
    assert data[44:64] == bytes(20) and set(data[64 + header_len : data_offset]) <= {0}
    header = json.loads(data[64 : 64 + header_len])
    assert zlib.crc32(data[64 : 64 + header_len]) == crc
    for entry in header["graph"]["tensors"]:
        if "data" in entry:
            ref = entry["data"]
            assert ref["offset"] % 64 == 0
            chunk = data[data_offset + ref["offset"] : data_offset + ref["offset"] + ref["nbytes"]]
            assert zlib.crc32(chunk) == ref["crc32"]


@pytest.mark.parametrize("name", ["int4", "uint4", "int2", "uint2"])
@given(data=st.data())
def test_packing_agrees_with_onnx(name, data):
    count = data.draw(st.integers(0, 40))
    values = data.draw(typed_array(name, (count,)))
    proto = numpy_helper.from_array(values.astype(getattr(ml_dtypes, name)))
    assert proto.data_type == getattr(onnx.TensorProto, name.upper())
    assert pack(values, TYPES[name]) == proto.raw_data
    assert unpack(proto.raw_data, TYPES[name], count).tolist() == values.tolist()


@pytest.mark.parametrize("name", ["int4", "uint4", "int2", "uint2", "ternary"])
def test_packing_hand_worked(name):
    # element 0 in the least significant bits, two's complement within the field
    cases = {
        "int4": ([-1, 2, -8], b"\x2f\x08"),  # 0xF | 2<<4, then 0x8 padded with zero
        "uint4": ([15, 0, 1], b"\x0f\x01"),
        "int2": ([1, -1, 0, -2, 1], b"\x8d\x01"),  # 01 | 11<<2 | 00<<4 | 10<<6 = 0x8D
        "uint2": ([3, 2, 1, 0, 3], b"\x1b\x03"),
        "ternary": ([-1, 0, 1, -1], b"\xd3"),  # 11 | 00<<2 | 01<<4 | 11<<6
    }
    values, packed = cases[name]
    assert pack(np.array(values), TYPES[name]) == packed
    assert unpack(packed, TYPES[name], len(values)).tolist() == values


@given(st.sampled_from(list(TYPES)), st.integers(0, 33))
def test_pack_unpack_every_type(name, count):
    lo, hi, bits = RANGES[name]
    values = np.resize(np.array([lo, hi, 0, lo + 1 if lo < hi else lo], np.int64), count).astype(TYPES[name].storage)
    raw = pack(values, TYPES[name])
    assert len(raw) == (count * bits + 7) // 8
    assert unpack(raw, TYPES[name], count).tolist() == values.tolist()


C_MAIN = r"""
#include <stdlib.h>
int main(int argc, char **argv) {
    if (argc != 2) return 2;
    FILE *f = fopen(argv[1], "rb");
    intq_preamble h;
    if (!f || intq_read_preamble(f, &h) != 0) { puts("error"); return 1; }
    printf("%u %u %llu %llu %llu %u\n", h.version, h.flags, (unsigned long long)h.header_nbytes,
           (unsigned long long)h.data_offset, (unsigned long long)h.data_nbytes, h.header_crc);
    /* the header is the JSON at offset 64 */
    char *json = malloc(h.header_nbytes + 1);
    if (fread(json, 1, h.header_nbytes, f) != h.header_nbytes) return 1;
    json[h.header_nbytes] = 0;
    printf("%.22s\n", json);
    /* unpack one int4 byte with the snippet from the doc's comment */
    unsigned char byte = 0x2f;
    for (int i = 0; i < 2; i++) { int v = (byte >> (4 * (i & 1))) & 0xF; if (v >= 8) v -= 16; printf("%d ", v); }
    puts("");
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_the_c_reader_in_the_docs_reads_a_real_file(tmp_path):
    doc = (ROOT / "docs" / "INTQ.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```c\n(.*?)```", doc, flags=re.DOTALL)
    assert len(blocks) == 1, "docs/INTQ.md should hold one C block"
    source = tmp_path / "reader.c"
    source.write_text(blocks[0] + C_MAIN)
    exe = tmp_path / "reader"
    subprocess.run(["gcc", "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(source)], check=True, capture_output=True, text=True)
    model = tmp_path / "m.intq"
    save(every_type_graph(), model)
    for path in (EXAMPLE, model):
        out = subprocess.run([str(exe), str(path)], check=True, capture_output=True, text=True).stdout.splitlines()
        raw = path.read_bytes()
        _, version, flags, header_len, data_offset, data_len, crc = struct.unpack_from("<8sIIQQQI", raw)
        assert out[0].split() == [str(v) for v in (version, flags, header_len, data_offset, data_len, crc)]
        assert out[1] == raw[64:86].decode()
        assert out[2].split() == ["-1", "2"]
    # and it rejects what is not an .intq file
    bad = tmp_path / "bad.intq"
    bad.write_bytes(b"INTQ\r\n\x1a\r" + bytes(56))
    assert subprocess.run([str(exe), str(bad)], capture_output=True, text=True).stdout.strip() == "error"


def test_load_memory_maps_large_byte_tensors_and_copies_small_ones(tmp_path):
    """Weights stay in the file mapping; a constant below COPY_BELOW_BYTES is copied out
    (the page cache may map a large folio for its first read), read-only all the same."""
    from refsim.intq import COPY_BELOW_BYTES

    k, n = 256, COPY_BELOW_BYTES // 256 * 2  # twice the threshold
    b = GraphBuilder("mm")
    x = b.input("x", "int8", [1, k])
    w = b.const(np.arange(k * n).reshape(k, n) % 256 - 128, "int8", name="w")
    y = b.node("MatMul", [x, w], outputs="y")
    bias = b.const(np.arange(n) % 7 - 3, "int32", name="bias")
    z = b.node("Add", [y, bias], outputs="z", dtype="int64")
    b.output(z)
    path = tmp_path / "mm.intq"
    save(b.build(), path)
    model = refsim.load(path)
    weight = model.graph.tensors["w"].data
    owner = weight
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(owner, memoryview), "the weight should be a view of the file mapping"
    mapping = owner.obj
    import mmap

    assert isinstance(mapping, mmap.mmap)
    start = np.frombuffer(mapping, np.uint8).__array_interface__["data"][0]
    address = weight.__array_interface__["data"][0]
    assert start <= address < start + len(mapping)
    assert not weight.flags.writeable
    small = model.graph.tensors["bias"].data
    assert small.flags.owndata and not small.flags.writeable
    address = small.__array_interface__["data"][0]
    assert not start <= address < start + len(mapping)
    out = model.run({"x": np.ones((1, k), np.int8)})["z"]
    expected = np.asarray(weight, np.int64).sum(axis=0) + (np.arange(n) % 7 - 3)
    assert out.tolist() == [expected.tolist()]


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    graph = every_type_graph()
    path = tmp_path / "m.intq"
    save(graph, path)
    before = path.read_bytes()
    import os

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        save(graph, path)
    monkeypatch.undo()
    assert path.read_bytes() == before, "the old file must survive a failed save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.intq"]
    # a graph that cannot be serialised leaves nothing behind either
    graph.metadata["bad"] = float("nan")
    with pytest.raises(refsim.RefsimError):
        save(graph, tmp_path / "n.intq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.intq"]


def test_saved_files_get_ordinary_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        save(every_type_graph(), tmp_path / "m.intq")
    finally:
        os.umask(umask)
    assert (tmp_path / "m.intq").stat().st_mode & 0o777 == 0o644


def test_the_example_is_what_its_build_script_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tiny_mlp", ROOT / "examples" / "build_tiny_mlp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert to_bytes(module.build()) == EXAMPLE.read_bytes(), "run examples/build_tiny_mlp.py to refresh the example"


def test_from_buffer_accepts_plain_bytes():
    graph = from_buffer(EXAMPLE.read_bytes(), "example")
    assert graph.name == "tiny_mlp"


def _per_channel_model(scales):
    b = GraphBuilder("per_channel")
    x = b.input("x", "int8", [1, len(scales)])
    w = b.const(np.eye(len(scales), dtype=np.int64), "int8", name="w", scale=list(scales), quant_axis=1)
    b.output(b.node("MatMul", [x, w], outputs="y"))
    return b.build()


def test_long_scale_vectors_are_stored_as_float64_data_and_read_back_exactly():
    scales = [0.1 * 3.0**-i for i in range(40)] + [1e-300, 5e-324, 1.7976931348623157e308]
    data = to_bytes(_per_channel_model(scales))
    header_len = struct.unpack_from("<Q", data, 16)[0]
    header = json.loads(data[64 : 64 + header_len])
    entry = next(t for t in header["graph"]["tensors"] if t["name"] == "w")
    assert set(entry["scale"]) == {"offset", "nbytes", "crc32"} and entry["scale"]["nbytes"] == 8 * len(scales)
    assert from_buffer(data).tensors["w"].scale == scales  # bit for bit: float64 both ways
    short = to_bytes(_per_channel_model([0.5, 0.25]))
    assert from_buffer(short).tensors["w"].scale == [0.5, 0.25]


def test_a_corrupted_stored_scale_vector_is_refused():
    data = bytearray(to_bytes(_per_channel_model([0.01 * (i + 1) for i in range(16)])))
    header_len, data_offset = struct.unpack_from("<QQ", data, 16)
    header = json.loads(data[64 : 64 + header_len])
    entry = next(t for t in header["graph"]["tensors"] if t["name"] == "w")
    data[data_offset + entry["scale"]["offset"]] ^= 0xFF
    with pytest.raises(refsim.errors.IntqFormatError, match="scale: data checksum mismatch"):
        from_buffer(bytes(data))
