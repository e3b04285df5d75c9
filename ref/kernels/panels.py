"""What the SIMD GEMMs share: packing a constant B matrix into the column panels their
micro-kernels read, and dealing the rows of A out into tasks.

Shared by the VNNI (int8, K in groups of 4) and AVX2 (int16, K in pairs) kernels, which
differ only in the element type and the group size."""

from __future__ import annotations

import numpy as np

from ..jit import njit

TASK_BLOCKS = 16  # at most this many micro-kernel row blocks (96 rows of A, in L2) per task
TASK_MULTIPLE = 4  # tasks come in fours: even shares for 1, 2 or 4 threads


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


@njit(cache=True, inline="always")
def task_count(blocks):
    """How many tasks a weight GEMM deals its `blocks` row blocks into: few, since every task
    streams all of B once (BERT-base's 768 x 3072 weights, 2.4 MB, fit no core's L2), each
    with its rows of A within L2. (numba.get_num_threads here would stop Numba caching the
    kernel: a dynamic global.)"""
    return min(blocks, TASK_MULTIPLE * ((blocks + TASK_MULTIPLE * TASK_BLOCKS - 1) // (TASK_MULTIPLE * TASK_BLOCKS)))


@njit(cache=True, inline="always")
def task_rows(g, tasks, blocks, rows_per_block, m):
    """Task g's first row, row count and block count. Blocks are dealt out evenly (22 blocks,
    128 rows: 5, 6, 5, 6, so two threads get 11 each; whole shares of TASK_BLOCKS gave 12
    and 10)."""
    first, last = g * blocks // tasks, (g + 1) * blocks // tasks
    row0 = first * rows_per_block
    return row0, min(m - row0, (last - first) * rows_per_block), last - first


@njit(cache=True, inline="always")
def share(i, parts, total):
    """Part i's range [first, last) of `total` things dealt into `parts` even parts."""
    return i * total // parts, (i + 1) * total // parts


@njit(cache=True, inline="always")
def task_grid(blocks, block_bytes, panels, threads, task_bytes):
    """(row tasks, column tasks) for a weight GEMM of `blocks` row blocks (block_bytes of A
    each) and `panels` B panels on `threads` threads. Rows are split first, into tasks of at
    most task_bytes of A (a whole multiple of the threads, so each gets even work); when
    there are fewer row tasks than threads (a batch of one), the columns are split too, so
    that each thread streams only its share of B, once (BERT-base's 768 x 3072 weights,
    2.4 MB, fit no core's L2), and copies A once."""
    threads = max(threads, 1)
    row_tasks = max(1, min(blocks, (blocks * block_bytes + task_bytes - 1) // task_bytes))
    if row_tasks >= threads:
        return min(blocks, (row_tasks + threads - 1) // threads * threads), 1
    return row_tasks, max(1, min(panels, (threads + row_tasks - 1) // row_tasks))
