"""Integer types of the IR, their value ranges, and sub-byte packing.

In memory every tensor is a NumPy array of its type's *storage* dtype (int2/int4/ternary in
int8, uint2/uint4 in uint8). On disk, sub-byte tensors are packed as ONNX and TFLite pack
them: element 0 in the least significant bits, the last byte zero-padded, signed values in
two's complement within their field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import RefsimError


@dataclass(frozen=True)
class IntType:
    """A declared integer type: its name, width in bits, signedness and value range."""

    name: str
    bits: int
    signed: bool
    lo: int
    hi: int
    storage: np.dtype

    @property
    def packed(self) -> bool:
        """True when several values share one byte on disk."""
        return self.bits < 8

    def nbytes(self, count: int) -> int:
        """Bytes that `count` elements take on disk (packed for sub-byte types)."""
        return (count * self.bits + 7) // 8

    def contains(self, lo: int, hi: int) -> bool:
        return self.lo <= lo and hi <= self.hi

    def __str__(self) -> str:
        return self.name


def _int_type(name: str, bits: int, signed: bool, storage: str) -> IntType:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return IntType(name, bits, signed, lo, hi, np.dtype(storage))


TYPES: dict[str, IntType] = {
    t.name: t
    for t in (
        _int_type("int2", 2, True, "int8"),
        _int_type("uint2", 2, False, "uint8"),
        _int_type("int4", 4, True, "int8"),
        _int_type("uint4", 4, False, "uint8"),
        _int_type("int8", 8, True, "int8"),
        _int_type("uint8", 8, False, "uint8"),
        _int_type("int16", 16, True, "int16"),
        _int_type("uint16", 16, False, "uint16"),
        _int_type("int32", 32, True, "int32"),
        _int_type("uint32", 32, False, "uint32"),
        _int_type("int64", 64, True, "int64"),
        # BitNet b1.58 weights: {-1, 0, 1}, stored on disk exactly as int2.
        IntType("ternary", 2, True, -1, 1, np.dtype("int8")),
    )
}

# Standard widths, narrowest first, used to pick a type that holds a computed range.
_SIGNED_LADDER = ("int8", "int16", "int32", "int64")
_UNSIGNED_LADDER = ("uint8", "uint16", "uint32")


def int_type(name: str | IntType) -> IntType:
    """Look a type up by name; a clear error for an unknown one."""
    if isinstance(name, IntType):
        return name
    try:
        return TYPES[name]
    except (KeyError, TypeError):
        raise RefsimError(
            f"unknown integer type {name!r}; known types: {', '.join(TYPES)}"
        ) from None


def type_for_range(lo: int, hi: int) -> IntType:
    """The narrowest standard type (8/16/32/64 bits) holding every value in [lo, hi]."""
    ladder = _UNSIGNED_LADDER + _SIGNED_LADDER if lo >= 0 else _SIGNED_LADDER
    for name in ladder:
        if TYPES[name].contains(lo, hi):
            return TYPES[name]
    raise RefsimError(f"no integer type of at most 64 bits holds the range [{lo}, {hi}]")


def value_range(array: np.ndarray) -> tuple[int, int]:
    """(min, max) of an integer array as Python ints; (0, 0) for an empty one."""
    if array.size == 0:
        return 0, 0
    return int(array.min()), int(array.max())


def check_fits(array: np.ndarray, t: IntType, what: str) -> None:
    """Raise unless every value of `array` lies in the range of `t`."""
    if array.size == 0:
        return
    info = np.iinfo(array.dtype) if array.dtype.kind in "iu" else None
    if info is not None and info.min >= t.lo and info.max <= t.hi:
        return
    lo, hi = value_range(array)
    if lo < t.lo or hi > t.hi:
        raise RefsimError(
            f"{what}: values span [{lo}, {hi}], outside {t.name} [{t.lo}, {t.hi}]"
        )


def pack(values: np.ndarray, t: IntType) -> bytes:
    """Little-endian bytes of `values` as type `t`; sub-byte types packed LSB first."""
    flat = np.asarray(values, order="C").reshape(-1)
    if not t.packed:
        return flat.astype(t.storage.newbyteorder("<"), copy=False).tobytes()
    return pack_lanes(flat, t.bits, 8).astype(np.uint8).tobytes()


def pack_lanes(values: np.ndarray, bits: int, word_bits: int) -> np.ndarray:
    """Values as `word_bits`-bit words (uint64) holding word_bits // bits fields each:
    element 0 in the least significant field, two's complement within a field, the last
    word zero-padded. (Sub-byte tensors on disk are this with 8-bit words.)"""
    flat = np.asarray(values).reshape(-1).astype(np.int64).view(np.uint64)
    lanes = word_bits // bits
    fields = flat & np.uint64((1 << bits) - 1)
    pad = (-fields.size) % lanes
    if pad:
        fields = np.concatenate([fields, np.zeros(pad, np.uint64)])
    fields = fields.reshape(-1, lanes)
    words = np.zeros(fields.shape[0], np.uint64)
    for lane in range(lanes):
        words |= fields[:, lane] << np.uint64(lane * bits)
    return words


def unpack(buffer, t: IntType, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: a flat array of `count` values in `t`'s storage dtype.

    For byte-sized and wider types this is a zero-copy view of `buffer`, so tensors
    read from a memory-mapped file stay on disk until touched.
    """
    if not t.packed:
        return np.frombuffer(buffer, dtype=t.storage.newbyteorder("<"), count=count)
    per_byte = 8 // t.bits
    raw = np.frombuffer(buffer, dtype=np.uint8, count=t.nbytes(count))
    shifts = np.arange(per_byte, dtype=np.uint8) * np.uint8(t.bits)
    fields = ((raw[:, None] >> shifts) & np.uint8((1 << t.bits) - 1)).reshape(-1)[:count]
    if t.signed:
        # Two's complement within the field: values at or above 2^(bits-1) are negative.
        signed = fields.astype(np.int8)
        signed[fields >= (1 << (t.bits - 1))] -= np.int8(1 << t.bits)
        return signed
    return fields
