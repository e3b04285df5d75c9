"""Broken files and wrong inputs give one clear RefsimError, never a crash, a traceback or a
hang: hand-made corruptions of every layer of an .intq file, a mutation fuzz of valid files,
and mistakes in the inputs a model is run on, through the Python API and the CLI."""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
import zlib
from datetime import timedelta

import numpy as np
import pytest
import refsim
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refsim import GraphBuilder, RefsimError
from refsim.cli import main as cli_main
from refsim.errors import AccumulatorOverflow, InputError, IntqFormatError
from refsim.intq import ALIGN, from_buffer, to_bytes
from seed_models import sample_graph

PREAMBLE = struct.Struct("<8sIIQQQI20x")


VALID = to_bytes(sample_graph())


def feeds(batch=2):
    rng = np.random.default_rng(0)
    return {"x": rng.integers(-128, 128, (batch, 8)).astype(np.int8), "ids": rng.integers(0, 10, batch).astype(np.int32)}


def split(data: bytes):
    magic, version, flags, header_len, data_offset, data_len, crc = PREAMBLE.unpack_from(data)
    header = json.loads(data[ALIGN : ALIGN + header_len])
    return header, data[data_offset:]


def assemble(header, section: bytes, *, version=1, flags=0, raw_header: bytes | None = None) -> bytes:
    """A file around `header` with a correct header checksum and layout."""
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    offset = (ALIGN + len(text) + ALIGN - 1) // ALIGN * ALIGN
    pre = PREAMBLE.pack(b"INTQ\r\n\x1a\n", version, flags, len(text), offset, len(section), zlib.crc32(text))
    return pre + text + bytes(offset - ALIGN - len(text)) + section


def header_edit(fn):
    """A corruption made on the parsed header, written back with a valid header checksum."""

    def corrupt(data):
        header, section = split(data)
        header = copy.deepcopy(header)
        fn(header)
        return assemble(header, section)

    return corrupt


def tensor(header, name):
    return next(t for t in header["graph"]["tensors"] if t["name"] == name)


def node(header, name):
    return next(n for n in header["graph"]["nodes"] if n["name"] == name)


def set_preamble(field, value):
    index = ["magic", "version", "flags", "header_len", "data_offset", "data_len", "crc"].index(field)

    def corrupt(data):
        fields = list(PREAMBLE.unpack_from(data))
        fields[index] = value
        return PREAMBLE.pack(*fields) + data[ALIGN:]

    return corrupt


def flip(offset_from_end):
    def corrupt(data):
        b = bytearray(data)
        b[len(b) - offset_from_end] ^= 0x40
        return bytes(b)

    return corrupt


def _data_crc_fixed(header_fn):
    """Edit the header and also the data, keeping the data checksums right."""

    def corrupt(data):
        header, section = split(data)
        section = bytearray(section)
        header_fn(header, section)
        return assemble(header, bytes(section))

    return corrupt


def _ternary_minus_two(header, section):
    ref = tensor(header, "w2")["data"]
    section[ref["offset"]] = 0b10  # int2 -2, not a ternary value
    ref["crc32"] = zlib.crc32(bytes(section[ref["offset"] : ref["offset"] + ref["nbytes"]]))


def _b1_over_w1(header, section):
    w1, b1 = tensor(header, "w1")["data"], tensor(header, "b1")["data"]
    b1["offset"] = w1["offset"]
    b1["crc32"] = zlib.crc32(bytes(section[w1["offset"] : w1["offset"] + b1["nbytes"]]))


def _cycle(h):
    node(h, "relu")["inputs"] = ["sum"]  # relu -> add -> relu


CORRUPTIONS = {
    "empty file": (lambda d: b"", "empty|too short"),
    "truncated preamble": (lambda d: d[:40], "too short"),
    "truncated header": (lambda d: d[:100], "header length .* runs past"),
    "truncated data": (lambda d: d[:-1], "truncated or padded"),
    "padded file": (lambda d: d + b"\0", "truncated or padded"),
    "bad magic": (lambda d: b"INTQ\n\n\x1a\n" + d[8:], "bad magic"),
    "a text file": (lambda d: b"hello world, this is not a model\n" * 4, "bad magic"),
    "unknown version": (set_preamble("version", 2), "unsupported .intq version 2"),
    "unknown flags": (set_preamble("flags", 1), "unknown flags"),
    "huge header length": (set_preamble("header_len", 1 << 60), "header length"),
    "huge data length": (set_preamble("data_len", (1 << 64) - 1), "truncated or padded"),
    "unaligned data offset": (set_preamble("data_offset", 65), "aligned"),
    "bad header checksum": (set_preamble("crc", 12345), "header checksum"),
    "garbled header": (lambda d: d[:70] + b"\xff" + d[71:], "header checksum"),
    "header not json": (lambda d: assemble(None, split(d)[1], raw_header=b"{not json"), "not valid JSON"),
    "header not utf-8": (lambda d: assemble(None, split(d)[1], raw_header=b'{"a": "\xff"}'), "not valid JSON"),
    "header is a list": (lambda d: assemble(None, split(d)[1], raw_header=b"[1, 2]"), "not a JSON object"),
    "deeply nested header": (lambda d: assemble(None, split(d)[1], raw_header=b"[" * 100000 + b"]" * 100000), "not valid JSON"),
    "bad data checksum": (flip(ALIGN), "data checksum"),
    "header version differs": (header_edit(lambda h: h.update(version=2)), "header version"),
    "header version not an int": (header_edit(lambda h: h.update(version=True)), "header version"),
    "wrong format": (header_edit(lambda h: h.update(format="onnx")), "format"),
    "graph missing": (header_edit(lambda h: h.pop("graph")), "no 'graph'"),
    "tensors not a list": (header_edit(lambda h: h["graph"].update(tensors={})), "tensors should be list"),
    "shape a string": (header_edit(lambda h: tensor(h, "x").update(shape="batch")), "shape should be list"),
    "negative dimension": (header_edit(lambda h: tensor(h, "x").update(shape=["batch", -8])), "invalid dimension"),
    "boolean dimension": (header_edit(lambda h: tensor(h, "x").update(shape=[True, 8])), "invalid dimension"),
    "dtype an int": (header_edit(lambda h: tensor(h, "x").update(dtype=8)), "dtype should be str"),
    "unknown dtype": (header_edit(lambda h: tensor(h, "x").update(dtype="int7")), "unknown dtype 'int7'"),
    "tensor declared twice": (header_edit(lambda h: h["graph"]["tensors"].append(tensor(h, "x"))), "declared twice"),
    "huge tensor size": (header_edit(lambda h: tensor(h, "w1").update(shape=[1 << 40, 1 << 40])), "more elements than any array can"),
    "nbytes past the end": (header_edit(lambda h: tensor(h, "w1")["data"].update(nbytes=1 << 62)), "outside the data section"),
    "offset past the end": (header_edit(lambda h: tensor(h, "w1")["data"].update(offset=1 << 20)), "outside the data section"),
    "negative offset": (header_edit(lambda h: tensor(h, "w1")["data"].update(offset=-64)), "non-negative"),
    "overlapping data": (header_edit(lambda h: tensor(h, "table")["data"].update(offset=tensor(h, "w1")["data"]["offset"], nbytes=tensor(h, "table")["data"]["nbytes"])), "overlap|checksum"),
    "overlapping data, checksums fixed": (_data_crc_fixed(_b1_over_w1), "overlap"),
    "ternary holding -2": (_data_crc_fixed(_ternary_minus_two), "outside ternary"),
    "symbolic constant": (header_edit(lambda h: tensor(h, "w1").update(shape=["n", 6])), "fully known shape"),
    "unknown op": (header_edit(lambda h: node(h, "relu").update(op="Gelu9")), "unknown op 'Gelu9'"),
    "unknown attribute": (header_edit(lambda h: node(h, "rq1")["attrs"].update(gain=3)), "unknown attribute 'gain'"),
    "attribute out of range": (header_edit(lambda h: node(h, "fc1")["attrs"].update(acc_bits=99)), "acc_bits.*<= 64"),
    "attribute of the wrong type": (header_edit(lambda h: node(h, "rq1")["attrs"].update(dtype=[1])), "integer type"),
    "attribute a float": (header_edit(lambda h: node(h, "rq1")["attrs"].update(axis=1.5)), "attribute values must be"),
    "attrs a list": (header_edit(lambda h: node(h, "rq1").update(attrs=[1])), "attrs should be dict"),
    "node inputs not names": (header_edit(lambda h: node(h, "relu").update(inputs=[3])), "must be tensor names"),
    "cycle": (header_edit(_cycle), "cycle"),
    "dangling input": (header_edit(lambda h: node(h, "relu").update(inputs=["nowhere"])), "'nowhere' is not a declared tensor"),
    "tensor never produced": (header_edit(lambda h: h["graph"]["tensors"].append({"name": "ghost", "dtype": "int8", "shape": [1]})), "'ghost' is neither"),
    "output never produced": (header_edit(lambda h: h["graph"]["outputs"].append("ghost")), "'ghost' has no tensor entry"),
    "two producers": (header_edit(lambda h: node(h, "relu").update(outputs=["h"])), "produced by both"),
    "declared type disagrees": (header_edit(lambda h: tensor(h, "h").update(dtype="int16")), "declared int16 but the op produces int8"),
    "declared shape disagrees": (header_edit(lambda h: tensor(h, "acc").update(shape=["batch", 7])), "shape"),
    "missing required input": (header_edit(lambda h: node(h, "fc1")["inputs"].__setitem__(1, "")), "required input"),
    "too many inputs": (header_edit(lambda h: node(h, "relu")["inputs"].append("x")), "takes inputs"),
    "blob outside the data": (header_edit(lambda h: h["blobs"][0].update(offset=1 << 30)), "outside the data section"),
    "blob declared twice": (header_edit(lambda h: h["blobs"].append(dict(h["blobs"][0]))), "blob .notes.txt. is declared twice"),
    "metadata not an object": (header_edit(lambda h: h.update(metadata=[1])), "metadata should be dict"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_files_give_a_clear_error(name, tmp_path, capsys):
    corrupt, message = CORRUPTIONS[name]
    data = corrupt(VALID)
    path = tmp_path / "broken.intq"
    path.write_bytes(data)
    with pytest.raises(IntqFormatError) as info:
        refsim.load(path)
    text = str(info.value)
    assert text.startswith(str(path)), f"the message should name the file: {text}"
    assert "\n" not in text
    import re

    assert re.search(message, text), f"{name}: {text!r} does not say {message!r}"
    for command in ("inspect", "run"):
        argv = [command, str(path)] + ([str(tmp_path / "missing.npz")] if command == "run" else [])
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("refsim: error: "), err


def test_the_valid_sample_loads_and_runs():
    model = refsim.Model(from_buffer(VALID, "sample"))
    out = model.run(feeds())
    assert out["logits"].shape == (2, 3) and out["label"].shape == (2,)


# --- wrong inputs -----------------------------------------------------------------------


def model():
    return refsim.Model(from_buffer(VALID, "sample"))


INPUT_MISTAKES = {
    "unknown input name": (lambda f: {**f, "y": f["x"]}, "unknown input.*'y'"),
    "missing input": (lambda f: {"x": f["x"]}, "missing input.*'ids'"),
    "wrong rank": (lambda f: {**f, "x": f["x"][0]}, "input 'x' has shape \\[8\\].*rank 1 instead of 2"),
    "wrong dimension": (lambda f: {**f, "x": np.zeros((2, 9), np.int8)}, "dimension 1 is 9 instead of 8"),
    "symbolic dimension bound twice": (lambda f: {**f, "ids": np.zeros(3, np.int32)}, "'batch'.* = 2 elsewhere"),
    "value out of range": (lambda f: {**f, "x": f["x"].astype(np.int16) + 200}, "outside int8"),
    "floats": (lambda f: {**f, "x": f["x"] + 0.5}, "must hold integers"),
    "strings": (lambda f: {**f, "x": np.array([["a"] * 8] * 2)}, "must hold integers"),
    "huge floats for int64 inputs": (lambda f: {**f, "ids": np.array([1e30, 0.0])}, "integers|outside"),
    "index out of range at run time": (lambda f: {**f, "ids": np.array([10, 0], np.int32)}, "node 'lookup' \\(Gather\\): .*index 10"),
}


@pytest.mark.parametrize("name", sorted(INPUT_MISTAKES))
def test_input_mistakes_give_a_clear_error(name):
    change, message = INPUT_MISTAKES[name]
    with pytest.raises(RefsimError, match=message) as info:
        model().run(change(feeds()))
    assert "\n" not in str(info.value)


def test_unknown_requested_output():
    with pytest.raises(InputError, match="no tensor named 'nope'"):
        model().run(feeds(), outputs=["nope"])


def test_accumulator_overflow_names_the_node():
    b = GraphBuilder("ovf")
    x = b.input("x", "int8", [1, 4])
    y = b.node("MatMul", [x, b.const(np.full((4, 1), -128), "int8")], name="proj", acc_bits=16)
    b.output(y)
    with pytest.raises(AccumulatorOverflow, match="node 'proj' \\(MatMul\\).*value 65536 at index \\(0, 0\\)"):
        b.model().run({"x": np.full((1, 4), -128, np.int8)})


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    path = tmp_path / "m.intq"
    path.write_bytes(VALID)
    bad_model = tmp_path / "bad.intq"
    bad_model.write_bytes(VALID[:-3])
    np.savez(tmp_path / "wrong.npz", x=np.zeros((2, 9), np.int8), ids=np.zeros(2, np.int32))
    (tmp_path / "numbers.txt").write_text("1 2 3\n")
    cases = [
        ["run", str(bad_model), str(tmp_path / "wrong.npz")],
        ["inspect", str(bad_model)],
        ["run", str(path), str(tmp_path / "wrong.npz")],
        ["run", str(path), str(tmp_path / "numbers.txt")],  # two inputs: text lines cannot feed them
        ["run", str(tmp_path / "absent.intq"), "-"],
        ["inspect", str(tmp_path)],
        ["run", str(path), str(tmp_path / "wrong.npz"), "--bogus-flag"],
    ]
    for argv in cases:
        result = subprocess.run([sys.executable, "-m", "refsim", *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (argv, result.stderr)
        assert "Traceback" not in result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("refsim: error: "), (argv, result.stderr)


# --- mutation fuzz ------------------------------------------------------------------------


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False, width=32),
    st.integers(-3, 70), st.sampled_from([-(1 << 63), (1 << 63) - 1, 1 << 64, -1, 10**30, 64, 128]),
    st.text(max_size=5),
)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


INTERESTING_INTS = [0, 1, -1, 2, 3, 5, 6, 7, 8, 31, 63, 64, 65, 1 << 31, -(1 << 63), (1 << 63) - 1, 1 << 70]
PLAUSIBLE_STRINGS = ["int8", "uint8", "int4", "ternary", "int32", "int64", "uint2", "MatMul", "Relu", "Concat",
                     "Slice", "Reshape", "floor", "double", "wrap", "saturate", "batch", ""]
ATTRIBUTES = ["axis", "axes", "perm", "shape", "starts", "ends", "steps", "dtype", "lo", "hi", "rounding",
              "acc_bits", "overflow", "transA", "transB", "keepdims", "div", "n_levels", "signed"]


@st.composite
def _same_kind(draw, value, names):
    """A different value of the same JSON kind: plausible, so it passes the type checks."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return draw(st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-3, 70)))
    if isinstance(value, str):
        return draw(st.sampled_from(names + PLAUSIBLE_STRINGS))
    if isinstance(value, list):
        value = copy.deepcopy(value)
        if value and draw(st.booleans()):
            i = draw(st.integers(0, len(value) - 1))
            if draw(st.booleans()):
                del value[i]
            else:
                value.insert(i, copy.deepcopy(value[i]))
        else:
            value = draw(st.permutations(value)) if value else [draw(st.sampled_from(INTERESTING_INTS))]
        return value
    if isinstance(value, dict):
        value = copy.deepcopy(value)
        if value and draw(st.booleans()):
            del value[draw(st.sampled_from(sorted(value)))]
        else:
            value[draw(st.sampled_from(ATTRIBUTES))] = draw(st.one_of(
                st.sampled_from(INTERESTING_INTS), st.sampled_from(PLAUSIBLE_STRINGS), st.booleans(),
                st.lists(st.integers(-3, 5), max_size=4)))
        return value
    return draw(JSON_VALUES)


@st.composite
def mutated_header(draw, header):
    header = copy.deepcopy(header)
    names = sorted(set(_strings(header)))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(header))[1:]
        inside = [p for p in paths if p[:1] == ("graph",) and len(p) > 2]
        # mostly mutate inside the graph, where the deeper checks live
        path = draw(st.sampled_from(inside if inside and draw(st.integers(0, 9)) else paths))
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        kind = draw(st.sampled_from(["same kind"] * 4 + ["replace", "delete", "duplicate"]))
        if kind == "delete":
            del parent[key]
        elif kind == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif kind == "same kind":
            parent[key] = draw(_same_kind(parent[key], names))
        else:
            parent[key] = draw(JSON_VALUES)
    return header


def _feeds_for(model):
    """Valid feeds for whatever inputs a (mutated) model declares, or None if too large."""
    rng = np.random.default_rng(0)
    out = {}
    sizes = {}
    for t in model.inputs:
        shape = [d if isinstance(d, int) else sizes.setdefault(d, 2) if isinstance(d, str) else 2 for d in t.shape]
        if np.prod(shape, dtype=object) > 10000:
            return None
        # small values: valid as indices too, so runs get past the first Gather
        out[t.name] = rng.integers(max(t.dtype.lo, -1), min(t.dtype.hi, 1), size=shape, endpoint=True, dtype=np.int64).astype(t.dtype.storage)
    return out


def _load_and_run(data: bytes, verify: bool):
    try:
        graph = from_buffer(data, "fuzzed.intq", verify=verify)
        model = refsim.Model(graph)
        f = _feeds_for(model)
        if f is not None:
            model.run(f)
            model.run(f, outputs=[n for n in graph.tensors][:3])
    except RefsimError as e:
        assert str(e) and "\n" not in str(e)


FUZZ = settings(max_examples=max(15 * settings.default.max_examples, 200), deadline=timedelta(seconds=30),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.data())
def test_fuzz_byte_mutations(data):
    buf = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if kind == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif buf:
            del buf[pos : pos + data.draw(st.integers(1, 8))]
    _load_and_run(bytes(buf), verify=data.draw(st.booleans()))


HEADER, SECTION = split(VALID)


@FUZZ
@given(mutated_header(HEADER), st.booleans())
def test_fuzz_header_mutations_with_a_valid_checksum(header, verify):
    _load_and_run(assemble(header, SECTION), verify)


@FUZZ
@given(st.data())
def test_fuzz_data_mutations_with_fixed_checksums(data):
    """Garbage weights with correct checksums reach validation and the ops themselves."""
    header = copy.deepcopy(HEADER)
    section = bytearray(SECTION)
    for t in header["graph"]["tensors"]:
        ref = t.get("data")
        if ref and ref["nbytes"] and data.draw(st.booleans()):
            start = ref["offset"]
            section[start : start + ref["nbytes"]] = data.draw(st.binary(min_size=ref["nbytes"], max_size=ref["nbytes"]))
            ref["crc32"] = zlib.crc32(bytes(section[start : start + ref["nbytes"]]))
    _load_and_run(assemble(header, bytes(section)), verify=True)
