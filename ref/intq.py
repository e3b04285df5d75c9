"""Reading and writing `.intq` files (format version 1, specified in docs/INTQ.md).

Layout: a 64-byte fixed preamble, a UTF-8 JSON header, zero padding to a 64-byte boundary,
then the data section holding every constant tensor and blob, each at a 64-byte aligned
offset. Reading memory-maps the file, so byte-sized and wider tensors are zero-copy views;
everything the header says is checked against the file before any of it is used. Writing
goes to a temporary file in the destination folder that is renamed into place, so a reader
never sees a half-written model.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .dtypes import TYPES, check_fits, int_type, pack, unpack
from .errors import IntqFormatError, RefsimError
from .ir import Graph, Node, Tensor, make_shape, validate

MAGIC = b"INTQ\r\n\x1a\n"
VERSION = 1
ALIGN = 64
PREAMBLE = struct.Struct("<8sIIQQQI20x")  # magic, version, flags, header, data offset, data size, header crc
assert PREAMBLE.size == ALIGN
MAX_HEADER_BYTES = 256 << 20
INLINE_SCALES = 8  # per-channel scale lists longer than this are stored as float64 data
# Constants smaller than this are copied out of the file mapping at load. The page cache
# may hold the file in large folios, and the first read of a small constant (a per-channel
# multiplier, a bias) then maps its whole folio: a MiniLM run touched 14 MB of the file
# that way, 2 MB for each of a few 1.5 KB vectors. Large constants (weights, embedding
# tables) stay mapped; the small ones add up to little.
COPY_BELOW_BYTES = 64 << 10


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# --- writing ---------------------------------------------------------------------------


def _json_number_list(value):
    if value is None:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return [float(v) if isinstance(v, (float, np.floating)) else int(v) for v in np.asarray(value).tolist()]
    return float(value) if isinstance(value, (float, np.floating)) else int(value)


def _tensor_entry(t: Tensor) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape)}
    if t.scale is not None:
        entry["scale"] = _json_number_list(t.scale)
    if t.zero_point is not None:
        entry["zero_point"] = _json_number_list(t.zero_point)
    if t.quant_axis is not None:
        entry["quant_axis"] = int(t.quant_axis)
    return entry


def _attr_json(value):
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_attr_json(v) for v in value]
    raise RefsimError(f"attribute value {value!r} is not an int, bool, string or list of them")


def to_bytes(graph: Graph) -> bytes:
    """Serialise a validated graph into `.intq` bytes."""
    validate(graph)
    chunks: list[bytes] = []
    offset = 0

    def place(data: bytes) -> dict[str, int]:
        nonlocal offset
        start = offset
        chunks.append(data)
        pad = _align(len(data)) - len(data)
        if pad:
            chunks.append(b"\0" * pad)
        offset += len(data) + pad
        return {"offset": start, "nbytes": len(data), "crc32": zlib.crc32(data)}

    tensors = []
    for t in graph.tensors.values():
        entry = _tensor_entry(t)
        if isinstance(entry.get("scale"), list) and len(entry["scale"]) > INLINE_SCALES:
            # Long per-channel scale vectors go to the data section as float64: as JSON
            # text they would make the header several times larger than they are.
            entry["scale"] = place(np.asarray(entry["scale"], "<f8").tobytes())
        if t.is_const:
            entry["data"] = place(pack(t.data, t.dtype))
        tensors.append(entry)
    blobs = [{"name": name, **place(bytes(data))} for name, data in graph.blobs.items()]
    header = {
        "format": "refsim.intq",
        "version": VERSION,
        "producer": f"refsim {__version__}",
        "graph": {
            "name": graph.name,
            "inputs": list(graph.inputs),
            "outputs": list(graph.outputs),
            "tensors": tensors,
            "nodes": [
                {
                    "name": n.name,
                    "op": n.op,
                    "inputs": list(n.inputs),
                    "outputs": list(n.outputs),
                    "attrs": {k: _attr_json(v) for k, v in n.attrs.items()},
                }
                for n in graph.nodes
            ],
        },
        "metadata": graph.metadata,
        "blobs": blobs,
    }
    try:
        header_bytes = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise RefsimError(f"graph metadata is not plain JSON: {e}") from None
    data_offset = _align(ALIGN + len(header_bytes))
    preamble = PREAMBLE.pack(MAGIC, VERSION, 0, len(header_bytes), data_offset, offset, zlib.crc32(header_bytes))
    padding = b"\0" * (data_offset - ALIGN - len(header_bytes))
    return b"".join([preamble, header_bytes, padding, *chunks])


def _new_file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename: all or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save(graph: Graph, path: str | os.PathLike) -> None:
    """Write `graph` to `path` as an `.intq` file (atomically)."""
    atomic_write(path, to_bytes(graph))


# --- reading ---------------------------------------------------------------------------


class _Reader:
    """Checks one header against one file; every error names the file and the field."""

    def __init__(self, path: str, buffer, verify: bool):
        self.path = path
        self.buffer = buffer
        self.verify = verify
        self.size = len(buffer)

    def fail(self, message: str):
        raise IntqFormatError(f"{self.path}: {message}")

    def preamble(self) -> tuple[dict, int, int]:
        if str(self.path).lower().endswith(".onnx"):
            self.fail("is an ONNX model, not a .intq; turn it into one with `refsim export` (a float model) "
                      "or `refsim import` (an already quantized one)")
        if self.size < ALIGN:
            self.fail(f"file is {self.size} bytes, too short for an .intq preamble ({ALIGN} bytes)")
        magic, version, flags, header_len, data_offset, data_len, header_crc = PREAMBLE.unpack_from(self.buffer, 0)
        if magic != MAGIC:
            self.fail("not an .intq file (bad magic bytes)")
        if version != VERSION:
            self.fail(f"unsupported .intq version {version} (this refsim reads version {VERSION})")
        if flags != 0:
            self.fail(f"unknown flags 0x{flags:x} in the preamble")
        if header_len > MAX_HEADER_BYTES or ALIGN + header_len > self.size:
            self.fail(f"header length {header_len} runs past the end of the file ({self.size} bytes)")
        if data_offset % ALIGN or data_offset < ALIGN + header_len:
            self.fail(f"data offset {data_offset} is not 64-byte aligned after the header")
        if data_offset + data_len != self.size:
            self.fail(
                f"data section [{data_offset}, {data_offset + data_len}) does not end at the file's "
                f"end ({self.size} bytes): truncated or padded file"
            )
        header_bytes = bytes(self.buffer[ALIGN : ALIGN + header_len])
        if zlib.crc32(header_bytes) != header_crc:
            self.fail("header checksum mismatch (corrupted file)")
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            self.fail(f"header is not valid JSON: {e}")
        if not isinstance(header, dict):
            self.fail("header is not a JSON object")
        return header, data_offset, data_len

    def get(self, obj: dict, key: str, kind, where: str, optional: bool = False):
        if not isinstance(obj, dict):
            self.fail(f"{where} is not a JSON object")
        if key not in obj:
            if optional:
                return None
            self.fail(f"{where} has no {key!r}")
        value = obj[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            name = getattr(kind, "__name__", str(kind))
            self.fail(f"{where}.{key} should be {name}, got {type(value).__name__}")
        return value

    def extent(self, ref: dict, where: str, data_len: int, expected_nbytes: int | None) -> tuple[int, int, int]:
        """Offset, size and checksum of one stored item, checked against the data section."""
        offset = self.get(ref, "offset", int, f"{where}.data")
        nbytes = self.get(ref, "nbytes", int, f"{where}.data")
        crc = self.get(ref, "crc32", int, f"{where}.data")
        if offset < 0 or offset % ALIGN:
            self.fail(f"{where}: data offset {offset} is not a non-negative multiple of {ALIGN}")
        if nbytes < 0 or offset + nbytes > data_len:
            self.fail(f"{where}: data [{offset}, {offset + nbytes}) lies outside the data section ({data_len} bytes)")
        if expected_nbytes is not None and nbytes != expected_nbytes:
            self.fail(f"{where}: holds {nbytes} bytes, its dtype and shape need {expected_nbytes}")
        return offset, nbytes, crc

    def check_crc(self, view, crc: int, where: str) -> None:
        if self.verify and zlib.crc32(view) != crc:
            self.fail(f"{where}: data checksum mismatch (corrupted file)")


def _parse_attr(value, reader: _Reader, where: str):
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, list) and all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
        return list(value)
    reader.fail(f"{where}: attribute values must be integers, booleans, strings or lists of them")


def from_buffer(buffer, path: str = "<memory>", verify: bool = True) -> Graph:
    """Parse `.intq` bytes (any buffer; a memory map for zero-copy tensors) into a Graph."""
    r = _Reader(path, buffer, verify)
    header, data_offset, data_len = r.preamble()
    if header.get("format") != "refsim.intq":
        r.fail("header format is not 'refsim.intq'")
    if type(header.get("version")) is not int or header["version"] != VERSION:
        r.fail(f"header version {header.get('version')!r} differs from the preamble's {VERSION}")
    g = r.get(header, "graph", dict, "header")
    name = r.get(g, "name", str, "graph")
    inputs = r.get(g, "inputs", list, "graph")
    outputs = r.get(g, "outputs", list, "graph")
    for label, names in (("inputs", inputs), ("outputs", outputs)):
        if not all(isinstance(n, str) for n in names):
            r.fail(f"graph.{label} must be a list of tensor names")
    tensors: dict[str, Tensor] = {}
    used: list[tuple[int, int, str]] = []
    for i, entry in enumerate(r.get(g, "tensors", list, "graph")):
        where = f"tensor #{i}"
        tname = r.get(entry, "name", str, where)
        where = f"tensor {tname!r}"
        if tname in tensors:
            r.fail(f"{where} is declared twice")
        dtype_name = r.get(entry, "dtype", str, where)
        if dtype_name not in TYPES:
            r.fail(f"{where}: unknown dtype {dtype_name!r}")
        t = int_type(dtype_name)
        dims = r.get(entry, "shape", list, where)
        try:
            shape = make_shape(dims)
        except RefsimError as e:
            r.fail(f"{where}: {e}")
        known = [d for d in shape if isinstance(d, int)]
        if math.prod(known) * max(t.bits, 8) >= 1 << 66:
            r.fail(f"{where}: shape {list(shape)} holds more elements than any array can")
        scale = entry.get("scale")
        if isinstance(scale, dict):
            offset, nbytes, crc = r.extent(scale, f"{where}.scale", data_len, None)
            if nbytes % 8:
                r.fail(f"{where}: stored scales take {nbytes} bytes, not a multiple of 8 (float64)")
            view = memoryview(buffer)[data_offset + offset : data_offset + offset + nbytes]
            r.check_crc(view, crc, f"{where}.scale")
            scale = np.frombuffer(view, "<f8").tolist()
            if not all(math.isfinite(v) for v in scale):
                r.fail(f"{where}: stored scales must be finite numbers")
            used.append((offset, nbytes, f"{where}.scale"))
        zero_point = entry.get("zero_point")
        quant_axis = r.get(entry, "quant_axis", int, where, optional=True)
        data = None
        if "data" in entry:
            if not all(isinstance(d, int) for d in shape):
                r.fail(f"{where}: a constant needs a fully known shape, got {list(shape)}")
            count = math.prod(shape)
            offset, nbytes, crc = r.extent(r.get(entry, "data", dict, where), where, data_len, t.nbytes(count))
            start = data_offset + offset
            view = memoryview(buffer)[start : start + nbytes]
            r.check_crc(view, crc, where)
            data = unpack(view, t, count).reshape(shape)
            if nbytes < COPY_BELOW_BYTES and not data.flags.owndata:
                data = data.copy()
                data.setflags(write=False)  # as read-only as the mapped ones
            if t.packed or t.name == "ternary":
                try:
                    check_fits(data, t, f"{path}: {where}")
                except RefsimError as e:
                    raise IntqFormatError(str(e)) from None
            used.append((offset, nbytes, where))
        tensors[tname] = Tensor(tname, t, shape, data, scale, zero_point, quant_axis)
    nodes = []
    for i, entry in enumerate(r.get(g, "nodes", list, "graph")):
        where = f"node #{i}"
        op_name = r.get(entry, "op", str, where)
        node_name = r.get(entry, "name", str, where, optional=True) or ""
        where = f"node {node_name or i!r} ({op_name})"
        node_inputs = r.get(entry, "inputs", list, where)
        node_outputs = r.get(entry, "outputs", list, where)
        if not all(isinstance(n, str) for n in node_inputs + node_outputs):
            r.fail(f"{where}: inputs and outputs must be tensor names")
        attrs = {
            str(k): _parse_attr(v, r, f"{where}.attrs.{k}")
            for k, v in r.get(entry, "attrs", dict, where, optional=True).items()
        } if "attrs" in entry else {}
        nodes.append(Node(op_name, list(node_inputs), list(node_outputs), attrs, node_name))
    metadata = r.get(header, "metadata", dict, "header", optional=True) or {}
    blobs: dict[str, bytes] = {}
    for i, entry in enumerate(r.get(header, "blobs", list, "header", optional=True) or []):
        bname = r.get(entry, "name", str, f"blob #{i}")
        if bname in blobs:
            r.fail(f"blob {bname!r} is declared twice")
        offset, nbytes, crc = r.extent(entry, f"blob {bname!r}", data_len, None)
        view = memoryview(buffer)[data_offset + offset : data_offset + offset + nbytes]
        r.check_crc(view, crc, f"blob {bname!r}")
        blobs[bname] = bytes(view)
        used.append((offset, nbytes, f"blob {bname!r}"))
    used.sort()
    for (o1, n1, w1), (o2, _, w2) in zip(used, used[1:]):
        if o1 + n1 > o2:
            r.fail(f"{w1} and {w2} overlap in the data section")
    graph = Graph(name, list(inputs), list(outputs), tensors, nodes, metadata, blobs)
    try:
        validate(graph)
    except RefsimError as e:
        raise IntqFormatError(f"{path}: {e}") from None
    return graph


def load_graph(path: str | os.PathLike, verify: bool = True) -> Graph:
    """Read an `.intq` file, memory-mapping its data section."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise IntqFormatError(f"{path}: file is empty")
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise RefsimError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RefsimError(f"{path}: is a directory, not an .intq file") from None
    except PermissionError:
        raise RefsimError(f"{path}: permission denied") from None
    graph = from_buffer(buffer, path, verify)
    graph.mapping = buffer
    return graph
