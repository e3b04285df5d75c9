"""Issue 17's reproducers, each a regression test: the readers refuse bad input with one
line, memory stays bounded, interrupted runs recover, op functions take int64 arrays.

(IBertLayerNorm against transformers' IntLayerNorm and ITAMax against PyITA's fastSoftmax
are in test_layernorm_ops.py and test_softmax_ops.py; the ONNX importers' reproducers are in
test_import_hardening.py; the fuzz campaign in test_fuzz.py.)
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import refsim
from core_strategies import CASES
from hypothesis import given, settings
from hypothesis import strategies as st
from refsim import GraphBuilder, ops
from refsim.cli import main as cli_main
from refsim.errors import InputError, IntqFormatError, OpError, RefsimError
from refsim.golden.vectorset import _owner_tag
from refsim.inputs import read_samples
from refsim.intq import from_buffer, to_bytes
from refsim.ir import Tensor

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_mlp.intq"  # one input x: int8 [batch, 16]
X = [Tensor("x", refsim.dtypes.int_type("int8"), ("batch", 16))]


def one_line_error(fn, *args, match=None, error=RefsimError):
    with pytest.raises(error) as info:
        fn(*args)
    text = str(info.value)
    assert text and "\n" not in text, text
    if match:
        assert match in text, text
    return text


def cli(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- 2. input readers ---------------------------------------------------------------------------


def npy_bytes(header: bytes, version: int = 1, data: bytes = b"") -> bytes:
    length = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + length + header + data


MALFORMED_HEADERS = {
    # what NumPy's parser raises for each, before refsim wrapped it
    "tokenize.TokenError": b"{'descr': '<i1', 'fortran_order': False, 'shape': (2, 16), ",
    "SyntaxError": b"{'descr': '<i1', 'fortran_order': False, 'shape': (2, 16),, }",
    "OverflowError (huge shape)": b"{'descr': '<i1', 'fortran_order': False, 'shape': (2, 99999999999999999999999999), }",
    "TypeError (bytes key)": b"{'descr': '<i1', 'fortran_order': False, 'shape': (2, 16), b'x': 1}",
    "not a dict": b"[1, 2, 3]",
    "object dtype": b"{'descr': '|O', 'fortran_order': False, 'shape': (2, 16), }",
    "record dtype": b"{'descr': [('a', '<i1')], 'fortran_order': False, 'shape': (2, 16), }",
    "subarray dtype": b"{'descr': ('<i1', (1 << 40,)), 'fortran_order': False, 'shape': (2, 16), }",
    "string dtype": b"{'descr': '<U3', 'fortran_order': False, 'shape': (2, 16), }",
    "negative dimension": b"{'descr': '<i1', 'fortran_order': False, 'shape': (2, -16), }",
    "bool shape": b"{'descr': '<i1', 'fortran_order': False, 'shape': (True, 16), }",
    "deep nesting": b"{'descr': " + b"(" * 400 + b"'<i1'" + b")" * 400 + b", 'fortran_order': False, 'shape': (2,), }",
}


@pytest.mark.parametrize("name", sorted(MALFORMED_HEADERS))
def test_malformed_npy_headers_are_one_line_errors(tmp_path, name):
    path = tmp_path / "x.npy"
    path.write_bytes(npy_bytes(MALFORMED_HEADERS[name], data=bytes(32)))
    one_line_error(read_samples, str(path), X, match=str(path), error=InputError)


def test_npy_version_3_and_truncated_files_are_refused(tmp_path):
    good = io.BytesIO()
    np.save(good, np.zeros((2, 16), np.int8))
    path = tmp_path / "x.npy"
    for data, message in [(good.getvalue()[:-1], "truncated"), (good.getvalue() + b"\0", "more data"),
                          (good.getvalue()[:5], "not a valid .npy"), (b"", "not a valid .npy"),
                          (b"\x93NUMPY\x03\x00" + good.getvalue()[8:], "version 3.0")]:
        path.write_bytes(data)
        one_line_error(read_samples, str(path), X, match=message, error=InputError)


def test_an_npz_holding_an_object_array_is_refused(tmp_path):
    # np.load raised "Object arrays cannot be loaded when allow_pickle=False" outside the try
    path = tmp_path / "x.npz"
    np.savez(path, x=np.array([1, "a"], dtype=object))
    one_line_error(read_samples, str(path), X, match="Python objects", error=InputError)


def test_an_npy_file_named_npz_is_refused(tmp_path):
    # np.load returned an ndarray, used as a context manager: TypeError
    path = tmp_path / "x.npz"
    np.save(tmp_path / "x.npy", np.zeros((1, 16), np.int8))
    os.replace(tmp_path / "x.npy", path)
    one_line_error(read_samples, str(path), X, match="not an .npz archive; name it .npy", error=InputError)


@pytest.mark.parametrize("damage", ["not a zip", "truncated", "bad crc", "bad member", "encrypted flag", "duplicate"])
def test_damaged_npz_archives_are_one_line_errors(tmp_path, damage):
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.arange(32, dtype=np.int8).reshape(2, 16))
    data = bytearray(buffer.getvalue())
    path = tmp_path / "x.npz"
    if damage == "not a zip":
        data = b"PK\x03\x04 not really"
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "bad crc":
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
            info = z.infolist()[0]
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        data[start + info.compress_size - 2] ^= 0xFF
    elif damage == "bad member":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.npy", b"\x93NUMPY garbage")
        data = path.read_bytes()
    elif damage == "encrypted flag":
        data[6] |= 1  # the local header's general purpose flags
        central = data.rfind(b"PK\x01\x02")
        data[central + 8] |= 1
    else:
        with zipfile.ZipFile(path, "w") as z, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
            for _ in range(2):
                np.save(member := io.BytesIO(), np.zeros((1, 16), np.int8))
                z.writestr("x.npy", member.getvalue())
        data = path.read_bytes()
    path.write_bytes(bytes(data))
    one_line_error(read_samples, str(path), X, match=str(path), error=InputError)


def test_an_npz_member_is_checked_against_the_model_before_it_is_inflated(tmp_path):
    """A 4 MB .npz inflating to 4 GB took 85 s and 4.2 GB before its shape was found wrong."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|i1", "fortran_order": False, "shape": (1 << 32,)})
            chunk = bytes(1 << 24)
            for _ in range(4):  # only the first 64 MB of the declared 4 GB: never read anyway
                member.write(chunk)
    assert path.stat().st_size < 1 << 20
    start = time.perf_counter()
    one_line_error(read_samples, str(path), X, match="does not fit input 'x'", error=InputError)
    assert time.perf_counter() - start < 5  # the header alone was read; nothing was inflated


def test_an_npz_member_must_hold_what_its_header_declares(tmp_path):
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        member = io.BytesIO()
        np.lib.format.write_array_header_1_0(member, {"descr": "|i1", "fortran_order": False, "shape": (2, 16)})
        z.writestr("x.npy", member.getvalue() + bytes(31))
    one_line_error(read_samples, str(path), X, match="truncated", error=InputError)


def test_bzip2_bombs_are_refused_before_inflating(tmp_path):
    # bzip2 and LZMA expand far more than deflate's 1032-fold: 2 GB from a few kB (only the
    # first megabyte is written here; the header is what counts)
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_BZIP2) as z:
        with z.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|i1", "fortran_order": False, "shape": (1 << 27, 16)})
            member.write(bytes(1 << 20))
    assert path.stat().st_size < 1 << 20
    one_line_error(read_samples, str(path), X, match="inflate more than", error=InputError)


def test_arrays_named_for_no_input_are_refused_before_reading(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((1, 16), np.int8), y=np.zeros(3))
    one_line_error(read_samples, str(path), X, match="holds array 'y', which is not an input", error=InputError)


def test_good_array_files_still_read_exactly(tmp_path):
    x = np.arange(-64, 64, dtype=np.int8).reshape(8, 16)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "f.npy", np.asfortranarray(x.astype(">i4")))
    np.savez_compressed(tmp_path / "x.npz", x=x)
    for name in ("x.npy", "f.npy", "x.npz"):
        (sample,) = read_samples(str(tmp_path / name), X, batch_axis=None)
        np.testing.assert_array_equal(sample.feeds["x"], x)
        assert sample.feeds["x"].flags.c_contiguous
        samples = read_samples(str(tmp_path / name), X)  # eight samples along axis 0
        np.testing.assert_array_equal(np.concatenate([s.feeds["x"] for s in samples]), x)


# --- 6. text inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["1_0", "\u0661\u0662", "\uff11\uff12", "0x10", "1e3", "1.0", "+-1", "--1", "\u00b2"])
def test_text_integers_are_ascii_decimal_only(tmp_path, token):
    path = tmp_path / "in.txt"
    path.write_text(" ".join([token] + ["0"] * 15) + "\n", encoding="utf-8")
    one_line_error(read_samples, str(path), X, match="is not an integer (decimal digits, optional sign)", error=InputError)


def test_text_integers_accept_signs_and_leading_zeros(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("+7 -007 " + " ".join(["0"] * 13) + " 0000000000000000000000000000012\n")
    (sample,) = read_samples(str(path), X)
    assert sample.feeds["x"].tolist() == [[7, -7] + [0] * 13 + [12]]


def test_a_long_token_is_not_echoed_in_full(tmp_path):
    path = tmp_path / "in.txt"
    for token in ("9" * 5000, "x" * 5000, str(1 << 63)):
        path.write_text(token + " 0" * 15 + "\n")
        text = one_line_error(read_samples, str(path), X, error=InputError)
        assert len(text) < 200 and ("5000 characters" in text or "fit 64 bits" in text), text
    path.write_text(str(-(1 << 63)) + " 0" * 15 + "\n")
    assert read_samples(str(path), X)[0].feeds["x"][0, 0] == -(1 << 63)  # fits int64; the model says int8 later


# --- 7. header fields and float inputs -------------------------------------------------------


def tiny_graph(**quant):
    b = GraphBuilder("q")
    x = b.input("x", "int8", ["batch", 4])
    b.output(b.node("Relu", [x], outputs="y"))
    graph = b.build()
    for key, value in quant.items():
        setattr(graph.tensors["x"], key, value)
    return graph


def edited(graph_bytes: bytes, tensor: str, **fields) -> bytes:
    import json
    import zlib

    header_len = struct.unpack_from("<Q", graph_bytes, 16)[0]
    header = json.loads(graph_bytes[64 : 64 + header_len])
    entry = next(t for t in header["graph"]["tensors"] if t["name"] == tensor)
    entry.update(fields)
    text = json.dumps(header).encode()
    offset = (64 + len(text) + 63) // 64 * 64
    data_offset, data_len = struct.unpack_from("<QQ", graph_bytes, 24)
    section = graph_bytes[data_offset:]
    pre = struct.pack("<8sIIQQQI20x", b"INTQ\r\n\x1a\n", 1, 0, len(text), offset, len(section), zlib.crc32(text))
    return pre + text + bytes(offset - 64 - len(text)) + section


@pytest.mark.parametrize("fields, message", [
    (dict(quant_axis=2**80, scale=[0.5, 0.25]), "should be int"),  # a JSON int beyond int64 is still an int:
    (dict(quant_axis=2, scale=0.5), "quant_axis 2 is not an axis"),
    (dict(quant_axis=-3, scale=0.5), "quant_axis -3 is not an axis"),
    (dict(scale=[]), "scale must be"),
    (dict(scale=float("nan")), "scale must be"),
    (dict(scale=float("inf")), "scale must be"),
    (dict(zero_point=2**70), "zero_point must be"),
    (dict(zero_point=[1, float("-inf")]), "zero_point must be"),
    (dict(shape=["batch", 2**70]), "more elements than any array"),
])
def test_header_fields_are_range_checked(fields, message):
    data = edited(to_bytes(tiny_graph()), "x", **fields)
    if fields.get("quant_axis") == 2**80:
        message = "quant_axis"
    one_line_error(from_buffer, data, match=message, error=IntqFormatError)


def test_quant_fields_are_checked_when_a_graph_is_built_too():
    with pytest.raises(RefsimError, match="quant_axis"):
        refsim.ir.validate(tiny_graph(quant_axis=5, scale=[0.5] * 4))


def image_model():
    b = GraphBuilder("img")
    x = b.input("x", "int8", ["batch", 4])
    b.metadata["input_quant"] = {"x": {"scale": 0.01, "zero_point": 0, "dtype": "int8"}}
    b.output(b.node("Relu", [x], outputs="y"))
    return refsim.Model(b.build())


@pytest.mark.parametrize("value", [1e308, -1e308, 1e300, np.finfo(np.float64).max])
def test_a_float_input_too_large_to_quantize_is_refused_without_numpy_warnings(tmp_path, value):
    path = tmp_path / "x.npy"
    np.save(path, np.array([[0.5, value, 0.0, 1.0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the RuntimeWarning leaked from x / scale
        text = one_line_error(refsim.inputs.load_samples, image_model(), str(path), error=InputError)
    assert "input 'x'" in text and "far outside the int8 range" in text and "[0, 1]" in text


def test_float_inputs_still_saturate_like_quantize_linear(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.array([[0.5, 2.0, -1e6, 1.0]]))
    (sample,) = refsim.inputs.load_samples(image_model(), str(path))
    assert sample.feeds["x"].tolist() == [[50, 127, -128, 100]]


@pytest.mark.parametrize("value", [np.inf, np.nan, 1e308])
def test_non_integer_float_feeds_leak_no_numpy_warnings(value):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_line_error(refsim.load(EXAMPLE).run, {"x": np.full((1, 16), value)}, match="must hold integers", error=InputError)


# --- 5. interruption ------------------------------------------------------------------------------


def _set_files(path: Path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


GOLDEN = [sys.executable, "-m", "refsim", "golden", str(EXAMPLE), str(ROOT / "examples" / "tiny_mlp_inputs.txt")]


def _killed_writer(out: Path, where: str, *extra: str) -> subprocess.CompletedProcess:
    """`refsim golden` in a child that dies like kill -9 (os._exit) at `where`."""
    code = f"""
import os, sys
from refsim.golden import vectorset
real_replace, real_exchange = os.replace, vectorset._exchange
def die(*args):
    os._exit(9)
if {where!r} == "writing":
    vectorset._Writer.write = lambda self, *a, **k: die()
elif {where!r} == "between renames":
    vectorset._exchange = lambda a, b: False
    calls = []
    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:
            die()
        real_replace(a, b)
    vectorset.os.replace = replace
elif {where!r} == "after exchange":
    vectorset.shutil.rmtree = lambda *a, **k: die()
from refsim.cli import main
sys.exit(main(sys.argv[1:]))
"""
    return subprocess.run([sys.executable, "-c", code, *GOLDEN[3:], "-o", str(out), *extra], capture_output=True, text=True)


def golden(*args) -> int:
    return cli_main(GOLDEN[3:] + [str(a) for a in args])


def test_an_interrupted_force_swap_is_recovered_on_the_next_run(tmp_path, capsys):
    out = tmp_path / "set"
    assert golden("-o", out, "--samples", "2") == 0
    before = _set_files(out)
    assert _killed_writer(out, "between renames", "--force", "--samples", "1").returncode == 9
    assert not out.exists()  # the window the issue found: the old set moved aside, the new one not in
    assert [p.name.endswith(".old") for p in tmp_path.iterdir()].count(True) == 1
    # the next run puts the old set back before deciding anything
    capsys.readouterr()
    assert golden("-o", out) == 2 and "already exists" in capsys.readouterr().err
    assert _set_files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_force_replaces_a_set_in_one_atomic_exchange(tmp_path):
    out = tmp_path / "set"
    assert golden("-o", out, "--samples", "2") == 0
    result = _killed_writer(out, "after exchange", "--force", "--samples", "1")
    if result.returncode != 9:  # no renameat2 here: the two-rename path ran (tested above)
        pytest.skip("this system cannot exchange two folders atomically")
    assert (out / "sample0000").exists() and not (out / "sample0001").exists()  # the new set, whole
    leftovers = [p for p in tmp_path.iterdir() if p.name != "set"]
    assert len(leftovers) == 1 and (leftovers[0] / "sample0001").exists()  # the old one, to be removed
    assert golden("-o", tmp_path / "other") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([leftovers[0].name, "other", "set"])  # not its set
    assert golden("-o", out, "--force") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "set"]


def test_partial_folders_of_killed_writers_are_removed(tmp_path):
    out = tmp_path / "set"
    assert _killed_writer(out, "writing").returncode == 9
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(".set.") and partial.name.endswith(".partial")
    # one of a live writer (this process) and one of an unknown format stay
    live = tmp_path / f".set.{_owner_tag()}.abc123.partial"
    live.mkdir()
    legacy = tmp_path / ".set.k2j4h5.partial"
    legacy.mkdir()
    assert golden("-o", out) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, legacy.name, "set"])


def test_ctrl_c_while_starting_up_is_one_line_and_exit_130():
    # `refsim` imports refsim.cli before main() runs: that must not load NumPy (or anything slow)
    probe = subprocess.run([sys.executable, "-c", "import sys, refsim.cli; print('numpy' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "False"
    # ... and an interrupt while main() imports the rest is handled
    code = """
import builtins, sys
real = builtins.__import__
def interrupted(name, *args, **kwargs):
    if name == "numpy":
        raise KeyboardInterrupt
    return real(name, *args, **kwargs)
builtins.__import__ = interrupted
from refsim.cli import main
sys.exit(main(["run", "model.intq", "inputs.txt"]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (130, "refsim: interrupted\n")


@pytest.mark.parametrize("delay", [0.2, 0.6, 2.0])
def test_a_real_sigint_at_any_moment_is_one_line_and_exit_130(delay):
    # What the `refsim` script does, once the interpreter itself is up (an interrupt before
    # that is Python's own start-up, not refsim's).
    code = "import sys; print('ready', file=sys.stderr, flush=True); from refsim.cli import console; console()"
    child = subprocess.Popen([sys.executable, "-c", code, "run", str(EXAMPLE), "-"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stderr.readline() == "ready\n"
    time.sleep(delay)  # importing NumPy and Numba, loading the model, or waiting on stdin
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert (child.returncode, err) == (130, "refsim: interrupted\n")


@pytest.mark.parametrize("then", ["raise RefsimError('-: no samples')", "return 0"])
def test_a_ctrl_c_something_swallowed_is_still_the_interrupt(then):
    # seen under load: llvmlite's ctypes callback (or a library's bare except) swallows the
    # KeyboardInterrupt; the command went on, then failed on its closed stdin with exit 2
    code = f"""
import signal, sys
from refsim.cli import console
from refsim.errors import RefsimError
import refsim.cli.run as command
def swallowing(args):
    try:
        signal.raise_signal(signal.SIGINT)
    except BaseException:
        pass
    {then}
command.main = swallowing
sys.argv = ["refsim", "run", "model.intq", "-"]
console()
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (130, "refsim: interrupted\n")


# --- 10. op functions take int64 arrays whose values fit ----------------------------------------


@pytest.fixture
def numpy_backend():
    """The public entry is the same on both backends; NumPy saves compiling int64 kernels."""
    with refsim.backend.use("numpy"):
        yield


def test_the_issue_example_igelu_takes_int64():
    x = np.array([-128, -3, 0, 5, 127])
    assert x.dtype == np.int64
    np.testing.assert_array_equal(ops.iGELU(x, b=-30, one=900), ops.iGELU(x.astype(np.int8), b=-30, one=900))
    too_wide = np.array([1 << 40])  # values that do not fit
    one_line_error(lambda: ops.iGELU(too_wide, b=-30, one=900), match="at most 32 bits", error=OpError)


NONLINEAR = [  # op, a narrow input that works, attributes
    ("iGELU", np.int8, dict(b=-30, one=900)),
    ("IBertGelu", np.int16, dict(b_int=-1000, c_int=-2000, n=14, shift_int=64)),
    ("ITAMax", np.int8, dict()),
    ("ITAPartialMax", np.int8, dict(group_width=4)),
    ("iSoftmax", np.int8, dict(coeffA=1, coeffB=27, coeffC=384, log2=20)),
    ("IBertSoftmax", np.int8, dict(x0_int=-7, b_int=27, c_int=279, exp_mul=1968898441, exp_shift=54)),
    ("TFLiteSoftmax", np.int8, dict(input_multiplier=1717986944, input_left_shift=22, diff_min=-496)),
    ("IBertLayerNorm", np.int16, dict(shift=0)),
]


@pytest.mark.parametrize("name, dtype, attrs", NONLINEAR, ids=[n for n, _, _ in NONLINEAR])
def test_nonlinear_ops_take_int64_arrays_whose_values_fit(numpy_backend, name, dtype, attrs):
    info = np.iinfo(dtype)
    x = np.random.default_rng(0).integers(info.min, info.max, (3, 8), endpoint=True).astype(dtype)
    x[0, 0], x[1, 1] = info.min, info.max
    fn = getattr(ops, name)
    expected = fn(x, **attrs)
    for wide in (np.int64, np.int32):
        np.testing.assert_array_equal(fn(x.astype(wide), **attrs), expected)


@settings(max_examples=40)
@given(data=st.data(), op=st.sampled_from(sorted(CASES)))
def test_every_core_op_gives_the_same_values_on_int64_copies(numpy_backend, data, op):
    case = data.draw(CASES[op])
    fn = getattr(ops, op)
    try:
        expected = fn(*case.inputs, **case.attrs)
    except RefsimError:
        return
    # signed inputs as int64 (NumPy's default); narrowing keeps signedness, so unsigned ones stay
    wide = [a.astype(np.int64) if isinstance(a, (np.ndarray, np.integer)) and a.dtype.kind == "i" else a
            for a in case.inputs]
    got = fn(*wide, **case.attrs)
    np.testing.assert_array_equal(got, expected)


def test_graphs_keep_the_declared_type_path():
    b = GraphBuilder("g")
    x = b.input("x", "int64", [4])
    with pytest.raises(RefsimError):  # iGELU takes at most 32-bit inputs; a graph declares int64
        b.node("iGELU", [x], outputs="y", b=-30, one=900)
        b.output("y")
        refsim.Model(b.build()).run({"x": np.zeros(4, np.int64)})


# --- what the fuzz campaign found --------------------------------------------------------------


def test_npz_member_names_that_are_not_utf8_or_hold_newlines(tmp_path):
    member = io.BytesIO()
    np.save(member, np.zeros((1, 16), np.int8))
    for name, flag_utf8 in (("x\n\u2561.npy", True), ("x.npy", True)):
        path = tmp_path / "odd.npz"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(name, member.getvalue())
        data = bytearray(path.read_bytes())
        if name == "x.npy":  # flag the name UTF-8 and make it invalid UTF-8
            for sig, flag_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
                at = data.find(sig)
                data[at + flag_at] |= 0x08  # bit 11 of the flags
                data[at + name_at] = 0xFF
        path.write_bytes(bytes(data))
        one_line_error(read_samples, str(path), X, error=InputError)


def test_the_tokenizer_record_is_checked():
    from refsim.text import text_reader_for

    for meta, blob, message in [
        ({"blob": "tok", "max_length": 8}, b"\xff\xfe not json", "not a valid tokenizers JSON"),
        ({"blob": "tok", "max_length": "8"}, None, "max_length must be an integer"),
        ({"blob": "tok", "max_length": 2**80}, None, "max_length must be an integer"),
        ({"blob": "tok", "max_length": 8, "pad_id": -1}, None, "pad_id must be a token id"),
        ({"blob": ["tok"], "max_length": 8}, None, "blob"),
        ({"blob": "tok", "max_length": 8, "inputs": {"nope": "ids"}}, None, "not inputs of the model"),
    ]:
        b = GraphBuilder("text")
        ids = b.input("input_ids", "int32", [1, 8])
        b.blobs["tok"] = blob if blob is not None else _tokenizer()
        b.metadata["tokenizer"] = meta
        b.output(b.node("Relu", [ids], outputs="y"))
        one_line_error(text_reader_for, refsim.Model(b.build()), match=message)


def _tokenizer() -> bytes:
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2}, unk_token="[UNK]")).to_str().encode()


def test_token_ids_beyond_the_input_type_are_refused_not_wrapped(tmp_path):
    b = GraphBuilder("text")
    ids = b.input("input_ids", "int8", [1, 4])
    b.blobs["tok"] = _tokenizer().replace(b'"a":2', b'"a":300')
    b.metadata["tokenizer"] = {"blob": "tok", "max_length": 4, "pad_id": 0}
    b.output(b.node("Relu", [ids], outputs="y"))
    path = tmp_path / "in.txt"
    path.write_text("a\n")
    one_line_error(refsim.inputs.load_samples, refsim.Model(b.build()), str(path), match="outside int8")


def test_integer_div_refuses_attributes_whose_product_leaves_int64():
    one_line_error(lambda: ops.IntegerDiv(np.zeros(2, np.int32), np.ones(2, np.int32), Delta=2**62, eps=1, eta=4),
                   match="leaves int64", error=OpError)


def test_a_memory_error_in_a_kernel_names_the_node(monkeypatch):
    from refsim.ops import OPS

    def exhausted(x):
        raise MemoryError

    monkeypatch.setattr(OPS["Relu"], "fn", exhausted)
    b = GraphBuilder("m")
    x = b.input("x", "int8", [2])
    b.output(b.node("Relu", [x], outputs="y", name="relu"))
    model = refsim.Model(b.build())
    one_line_error(model.run, {"x": np.zeros(2, np.int8)}, match="node 'relu' (Relu): not enough memory", error=OpError)
