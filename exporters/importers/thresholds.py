"""The thresholds of a quantized function of a wide integer, found at import time.

`QuantizeLinear(f(DequantizeLinear(acc)))` with f elementwise (NNCF's GELU on a MatMul
accumulator, per-channel scale, float bias) is, channel by channel, an integer step function
q_c(acc): 32-bit inputs are too many for a lookup table, but q_c changes level only a few
hundred times (an 8-bit output changes at most 255 times on each monotone piece of f). The
`Threshold` op (ref/ops/threshold.py) computes such a function exactly from its level
changes: y = y0 + #{up thresholds <= acc} - #{down thresholds <= acc}.

The level changes are found on the function as refsim evaluates it at import (onnx's float32
reference ops, the same arithmetic a lookup table would hold): sampled across the
accumulator's whole range at most 2^-3 apart in the dequantized value (at most 65,536 samples
per channel), then, between two samples with different results, each level's first
accumulator found by bisection. Between two samples the function is taken to be monotone
(GELU turns once, at -0.75, and within 2^-3 of its minimum varies by under 4e-3: a level
boundary closer than that to the minimum could hide between two samples).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

SPACING = 2.0**-3  # largest gap between samples, in dequantized units
MAX_SAMPLES = 1 << 16  # per channel
CHUNK = 1 << 21  # values evaluated at once (rows of samples, all channels)
NEVER = 1 << 31  # a padding threshold: above every 32-bit input


def step_thresholds(q_of: Callable[[np.ndarray], np.ndarray], bound: np.ndarray, unit: np.ndarray):
    """(y0, up, down) with Threshold(acc, y0, up, down) == q_of(acc) for |acc[..., c]| <= bound[c].

    q_of maps an (M, C) int64 array (column c holding channel c's accumulators) to the
    quantized results; `unit` is the dequantized size of one accumulator step per channel."""
    bound = np.asarray(bound, np.int64)
    channels = bound.size
    n = np.ceil(2.0 * bound * np.asarray(unit, np.float64) / SPACING).astype(np.int64) + 1
    samples = int(np.clip(n, 2, np.minimum(2 * bound + 1, MAX_SAMPLES)).max(initial=2))
    grid = np.rint(np.linspace(-bound, bound, samples)).astype(np.int64)  # (samples, C), each column ascending
    rows = max(1, CHUNK // channels)
    q = np.concatenate([np.asarray(q_of(grid[r:r + rows]), np.int64) for r in range(0, samples, rows)])
    ups, downs = [[] for _ in range(channels)], [[] for _ in range(channels)]
    i, c = np.nonzero(q[1:] != q[:-1])
    if i.size:
        # one task per level crossed between two samples: the first acc in (lo, hi] reaching it
        p, r = q[i, c], q[i + 1, c]
        count = np.abs(r - p)
        task = np.repeat(np.arange(i.size), count)
        offset = np.arange(task.size) - np.repeat(np.cumsum(count) - count, count)
        rising = (r > p)[task]
        level = np.where(rising, p[task] + 1 + offset, r[task] + offset)
        chan = c[task]
        first = _bisect(q_of, chan, grid[i, c][task], grid[i + 1, c][task], level, rising, channels)
        for ch, t, up in zip(chan.tolist(), first.tolist(), rising.tolist()):
            (ups if up else downs)[ch].append(t)
    return q[0].copy(), _padded(ups), _padded(downs)


def _bisect(q_of, chan, lo, hi, level, rising, channels: int) -> np.ndarray:
    """For each task the smallest acc in (lo, hi] whose result reaches `level` (>= when rising,
    <= when falling), given that lo's does not and hi's does."""
    order = np.argsort(chan, kind="stable")
    chan, lo, hi, level, rising = chan[order], lo[order], hi[order], level[order], rising[order]
    starts = np.searchsorted(chan, chan, side="left")
    rank = np.arange(chan.size) - starts  # row of each task in its channel's column
    rows = int(rank.max()) + 1
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        grid = np.zeros((rows, channels), np.int64)
        grid[rank, chan] = mid
        got = np.asarray(q_of(grid), np.int64)[rank, chan]
        reached = np.where(rising, got >= level, got <= level) | (hi - lo <= 1)
        hi = np.where(reached, np.where(hi - lo > 1, mid, hi), hi)
        lo = np.where(reached, lo, mid)
    first = np.empty_like(hi)
    first[order] = hi
    return first


def _padded(rows: list[list[int]]) -> np.ndarray:
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), NEVER, np.int64)
    for c, r in enumerate(rows):
        out[c, :len(r)] = sorted(r)
    return out
