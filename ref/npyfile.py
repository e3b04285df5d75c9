"""Reading `.npy` and `.npz` files without trusting them.

`numpy.load` is made for files you wrote yourself: it unpickles on request, decompresses
an `.npz` member before anyone can look at its shape, and reports a malformed header with
whatever the parser raised (SyntaxError, OverflowError, tokenize errors). refsim reads
user files, so it reads them in two steps:

1. the header: NumPy's own header parser, then refsim's rules: a plain integer, bool or
   float dtype (never objects, strings or records), a shape of non-negative integers;
2. the data, only after `check(name, header)` accepted the header (the caller compares it
   with the model) and only as many bytes as the header declares, streamed into one array
   of that size. An `.npy` must hold them; an `.npz` member is decompressed in chunks and
   must produce exactly them.

So a file can make refsim allocate what its header declares and the caller accepts, never
more (a small `.npz` cannot inflate past its checked shape). Every problem is an
`InputError` naming the file (and the member) in one line.
"""

from __future__ import annotations

import io
import lzma
import math
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import InputError

# Scalar types an input array may hold: what the engine turns into the model's integers
# (floats for models that quantize their inputs, or integer-valued floats).
_KINDS = {"b": "bool", "i": "signed integer", "u": "unsigned integer", "f": "float"}
_CHUNK = 1 << 20
# Deflate (what NumPy writes) cannot expand more than about 1032-fold; bzip2 and LZMA
# members can. Past a gigabyte, a member expanding further is taken for a zip bomb.
_BOMB_BYTES = 1 << 30
_BOMB_RATIO = 1100
# How zipfile and its decompressors report a damaged archive or member (bz2 uses OSError;
# a truncated stream EOFError; an unknown compression method NotImplementedError; a member
# name flagged UTF-8 that is not UnicodeDecodeError).
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, OSError, EOFError,
                   NotImplementedError, UnicodeDecodeError)
_MESSAGE_CHARS = 160


@dataclass(frozen=True)
class ArrayHeader:
    """What an array file declares about the array that follows."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


Check = Callable[[str | None, ArrayHeader], None]


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."


def read_header(f, where: str) -> ArrayHeader:
    """Parse and vet one `.npy` header from the binary stream `f` (left at the data)."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise InputError(f"{where}: .npy format version {version[0]}.{version[1]} is not supported (1.0 and 2.0 are)")
    except InputError:
        raise
    except Exception as e:  # NumPy's parser: ValueError, SyntaxError, OverflowError, tokenize errors, ...
        raise InputError(f"{where}: not a valid .npy array: {_short(e) or type(e).__name__}") from None
    if dtype.hasobject:
        raise InputError(f"{where}: holds Python objects, which refsim never unpickles")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in _KINDS:
        raise InputError(f"{where}: holds {_short(dtype)} values; refsim reads integer, bool or float arrays")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"{where}: invalid shape {_short(shape)}")
    header = ArrayHeader(tuple(shape), dtype, bool(fortran))
    if header.nbytes >= 1 << 63:
        raise InputError(f"{where}: shape {_short(list(shape))} is impossibly large")
    return header


def _read_data(f, header: ArrayHeader, where: str) -> np.ndarray:
    """Exactly header.nbytes from `f`, in chunks, into one array of the header's shape."""
    array = np.empty(header.shape, header.dtype, order="F" if header.fortran_order else "C")
    view = memoryview(array.reshape(-1, order="A").view(np.uint8)) if array.size else memoryview(b"")
    filled = 0
    while filled < header.nbytes:
        count = f.readinto(view[filled : filled + _CHUNK])
        if not count:
            raise InputError(f"{where}: truncated: the header declares {header.nbytes} data bytes, the file holds {filled}")
        filled += count
    if f.read(1):
        raise InputError(f"{where}: holds more data than its header declares ({header.nbytes} bytes)")
    return np.ascontiguousarray(array)


def read_npy(path: str, check: Check | None = None) -> np.ndarray:
    """The array in an `.npy` file, after `check(None, header)` accepted its header."""
    try:
        with open(path, "rb") as f:
            header = read_header(f, path)
            remaining = _remaining(f)
            if header.nbytes > remaining:
                raise InputError(f"{path}: truncated: the header declares {header.nbytes} data bytes, the file holds {remaining}")
            if check is not None:
                check(None, header)
            return _read_data(f, header, path)
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read: {_short(e)}") from None


def _remaining(f) -> int:
    here = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(here)
    return end - here


def read_npz(path: str, check: Check | None = None) -> dict[str, np.ndarray]:
    """Every array in an `.npz` archive by name (member name without `.npy`).

    All headers are read and checked first, then the members are decompressed one by one.
    """
    try:
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                raise InputError(f"{path}: is a single .npy array, not an .npz archive; name it .npy")
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            names = [_key(m.filename) for m in members]
            duplicated = sorted({n for n in names if names.count(n) > 1})
            if duplicated:
                raise InputError(f"{path}: holds several arrays named {duplicated[0]!r}")
            headers = []
            for member, name in zip(members, names):
                where = f"{path}[{name!r}]"
                if member.flag_bits & 0x1:
                    raise InputError(f"{where}: the member is encrypted")
                with archive.open(member) as stream:
                    header = read_header(stream, where)
                if check is not None:
                    check(name, header)
                if header.nbytes > _BOMB_BYTES and header.nbytes > _BOMB_RATIO * max(member.compress_size, 1):
                    raise InputError(
                        f"{where}: declares {header.nbytes} bytes from {member.compress_size} compressed bytes; "
                        f"refusing a member that would inflate more than {_BOMB_RATIO}-fold past {_BOMB_BYTES >> 30} GiB"
                    )
                headers.append(header)
            arrays = {}
            for member, name, header in zip(members, names, headers):
                with archive.open(member) as stream:
                    read_header(stream, f"{path}[{name!r}]")
                    arrays[name] = _read_data(stream, header, f"{path}[{name!r}]")
            return arrays
    except _ARCHIVE_ERRORS as e:
        raise InputError(f"{path}: not a readable .npz archive: {_short(e) or type(e).__name__}") from None


def _key(member_name: str) -> str:
    return member_name[:-4] if member_name.endswith(".npy") else member_name
