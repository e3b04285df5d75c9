"""Packing a constant B matrix into the column panels the SIMD GEMM micro-kernels read.

Shared by the VNNI (int8, K in groups of 4) and AVX2 (int16, K in pairs) kernels, which
differ only in the element type and the group size."""

from __future__ import annotations

import numpy as np


def padded(n: int, block: int) -> int:
    """n rounded up to a multiple of block."""
    return (n + block - 1) // block * block


def pack_panels(b: np.ndarray, group: int, panel: int, dtype) -> np.ndarray:
    """A (K, N) matrix as flat panels of `panel` columns: within a panel, K runs in groups
    of `group` consecutive values per column (the micro-kernel's load order). K and N are
    zero-padded to whole groups and panels; zero rows of B make padded A values harmless."""
    k, n = b.shape
    kp, np_ = padded(max(k, 1), group), padded(max(n, 1), panel)
    full = np.zeros((kp, np_), dtype)
    full[:k, :n] = b
    # Axes of the reshape: group of K, value in the group, panel, column in the panel.
    groups = full.reshape(kp // group, group, np_ // panel, panel)
    return np.ascontiguousarray(groups.transpose(2, 0, 3, 1)).reshape(-1)
