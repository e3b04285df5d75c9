"""Integer softmax / GELU / LayerNorm kernels against float NumPy on the same data.

    .venv/bin/python benchmarks/bench_nonlinear.py [--repeat 15]

Shapes of a BERT-base layer: softmax over (12, 128, 128) and (12, 512, 512) attention
scores, GELU over (128, 3072), LayerNorm over (128, 768). For each shape the float NumPy
version of the function runs on the dequantized data (float32), and every integer variant
on the int8 data; the table gives each one's median time and its ratio to float NumPy
(target: within 2x). The first call of each integer kernel (Numba compilation, or loading
it from the on-disk cache) is reported separately and not counted. All kernels are timed in
turn, round after round, with medians and best times.

The integer kernels run on both cores (Numba `prange`). On a machine shared with other busy
processes a descheduled worker thread stalls a kernel for a scheduler slice (several ms),
which inflates medians: read the best times too, or compare with NUMBA_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numba
import numpy as np
from refsim import backend, ops
from refsim.exporters import nonlinear as nl


def float_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def float_gelu(x):
    # NumPy has no erf; the tanh form is the float GELU frameworks ship.
    return 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x * x * x)))


def float_layernorm(x, w, b):
    mean = x.mean(axis=-1, keepdims=True)
    d = x - mean
    return d / np.sqrt((d * d).mean(axis=-1, keepdims=True) + 1e-5) * w + b


def first_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_in_turn(fns: dict, repeat: int) -> dict:
    """Each callable timed once per round, round after round, so that load from other
    processes falls on all of them alike; returns name -> list of times."""
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def integer_variants(kind: str, rng):
    """(name, callable) pairs of the integer kernels for one function, at realistic scales."""
    if kind == "softmax":
        params = [
            ("ITAMax", nl.ita_softmax_params(preset="deeploy")),
            ("ITAPartialMax", nl.ita_softmax_params(streaming=True, preset="ita_rtl", acc_bits=19, overflow="saturate")),
            ("iSoftmax", nl.isoftmax_params(0.05)),
            ("IBertSoftmax", nl.ibert_softmax_params(0.05)),
            ("TFLiteSoftmax", nl.tflite_softmax_params(0.05)),
        ]
    elif kind == "gelu":
        params = [
            ("iGELU", nl.igelu_params(0.05)),
            ("RequantizediGELU", nl.requantized_igelu_params(0.05, 0.05)),
            ("IBertGelu", nl.ibert_gelu_params(0.05, n=0)),
            ("ITAGelu", nl.pyita_gelu_params(0.05)),
        ]
    else:
        w, b = rng.normal(1.0, 0.2, 768), rng.normal(0.0, 0.1, 768)
        params = [
            ("iLayerNorm", nl.ilayernorm_params(0.05, w, b, 8 / 127)),
            ("IBertLayerNorm", nl.ibert_layernorm_params(0.05, w, b)),
            ("iNoNorm", nl.inonorm_params(0.05, w, b, 8 / 127)),
            ("NoNorm", nl.nonorm_params(0.05, w, b)),
        ]
    for name, p in params:
        consts = [p.consts[k] for k in p.consts]
        op = getattr(ops, p.op)
        yield name, (lambda x, op=op, consts=consts, attrs=p.attrs: op(x, *consts, **attrs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"numba {numba.__version__} ({numba.get_num_threads()} threads, {numba.threading_layer() if numba.config.THREADING_LAYER else ''} layer), "
          f"numpy {np.__version__}, {os.cpu_count()} CPUs, backend {backend.current()}")
    cases = [
        ("softmax", (12, 128, 128)),
        ("softmax", (12, 512, 512)),
        ("gelu", (128, 3072)),
        ("layernorm", (128, 768)),
    ]
    header = f"{'function':10} {'shape':13} {'kernel':17} {'median ms':>9} {'x float':>7} {'best ms':>8} {'x float':>7} {'1st call ms':>11}"
    print("\n" + header)
    worst_median = worst_best = 0.0
    for kind, shape in cases:
        scale = 0.05
        x_int = np.clip(np.round(rng.normal(0, 2.0, shape) / scale), -128, 127).astype(np.int8)
        x_float = x_int.astype(np.float32) * np.float32(scale)
        if kind == "softmax":
            fns = {"float NumPy": lambda: float_softmax(x_float)}
        elif kind == "gelu":
            fns = {"float NumPy": lambda: float_gelu(x_float)}
        else:
            w32, b32 = rng.normal(1, 0.2, shape[-1]).astype(np.float32), rng.normal(0, 0.1, shape[-1]).astype(np.float32)
            fns = {"float NumPy": lambda: float_layernorm(x_float, w32, b32)}
        for name, fn in integer_variants(kind, rng):
            fns[name] = lambda fn=fn: fn(x_int)
        first = {name: first_call(fn) for name, fn in fns.items()}
        times = timed_in_turn(fns, args.repeat)
        ref_median, ref_best = statistics.median(times["float NumPy"]), min(times["float NumPy"])
        label = "x".join(map(str, shape))
        for i, (name, ts) in enumerate(times.items()):
            median, best = statistics.median(ts), min(ts)
            if name != "float NumPy":
                worst_median, worst_best = max(worst_median, median / ref_median), max(worst_best, best / ref_best)
            jit = "" if name == "float NumPy" else f"{first[name] * 1e3:11.1f}"
            print(f"{kind if i == 0 else '':10} {label if i == 0 else '':13} {name:17} {median * 1e3:9.3f} "
                  f"{median / ref_median:7.2f} {best * 1e3:8.3f} {best / ref_best:7.2f} {jit}")
    print(f"\nworst ratio to float NumPy: {worst_median:.2f} by medians, {worst_best:.2f} by best times (target <= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
