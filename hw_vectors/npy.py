"""Target `npy`: one NumPy `.npy` file per tensor and sample.

The array has the tensor's storage dtype (the declared width: int8, uint16, int32, ...);
sub-byte types (int4, uint2, ternary) are unpacked, one value per int8/uint8 element. This
is the form `refsim check` reads, so every vector set has it.
"""

from __future__ import annotations

import io

import numpy as np


def describe(options) -> dict:
    return {"format": "NumPy .npy v1, one file per tensor per sample, storage dtype, sub-byte values unpacked"}


def npy_bytes(array: np.ndarray) -> memoryview:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, order="C"), allow_pickle=False)  # ascontiguousarray would make 0-d arrays 1-d
    return buffer.getbuffer()


def write(ctx) -> None:
    for name in ctx.selected:
        ctx.emit(f"{ctx.file_name(name)}.npy", npy_bytes(ctx.sample.arrays[name]), tensor=name)
