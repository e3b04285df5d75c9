"""The VNNI weight GEMM against its ceiling, on the shapes of BERT-base and MiniLM.

    python benchmarks/bench_gemm.py [--m 128] [--repeats 50] [--plain]

Prints, per shape (M x K x N) and thread count (1: the sequential twin, as the engine runs
one-thread steps; 2: the parallel kernel), refsim's GMAC/s with its requantization fused
(--plain: int32 sums only), onnxruntime's int8 MatMulInteger (uint8 x int8 -> int32, B a
constant initializer, so prepacked) on the same operands in the same run, and the ratio.
Then the micro-kernel alone on L1-resident operands (MR rows x NR columns, K = 256): the
VPDPBUSD throughput the whole GEMM is bounded by.

Each figure is the fastest of `repeats` runs (the machine is shared: the minimum is the
least disturbed); nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SHAPES = [(768, 768), (768, 3072), (3072, 768), (384, 384), (384, 1536), (1536, 384)]


def fastest(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def ort_session(b: np.ndarray, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = b.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zp"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, n])],
        [numpy_helper.from_array(b.astype(np.int8), "b"), numpy_helper.from_array(np.array(128, np.uint8), "a_zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx._serialize(model) if hasattr(onnx, "_serialize") else model.SerializeToString(),
                                options, providers=["CPUExecutionProvider"])


def micro_kernel_rate(repeats: int) -> float:
    """GMAC/s of the micro-kernel alone, A and the B panel in L1 (K = 256: 16 KiB of B)."""
    from refsim import jit

    jit.materialize()
    from numba import njit
    from refsim.kernels import vnni

    kernel = vnni.micro_kernel

    @njit
    def spin(a, b, c, k_groups, calls):
        for _ in range(calls):
            kernel(a, 0, 4 * k_groups, b, 0, c, vnni.NR, k_groups, False)

    k_groups, calls = 64, 20000
    a = np.ones(vnni.MR * 4 * k_groups, np.uint8)
    b = np.ones(4 * k_groups * vnni.NR, np.int8)
    c = np.empty((vnni.MR, vnni.NR), np.int32)
    seconds = fastest(lambda: spin(a, b, c, k_groups, calls), max(3, repeats // 10))
    return vnni.MR * vnni.NR * 4 * k_groups * calls / seconds / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, default=128)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--plain", action="store_true", help="int32 sums, no fused requantization")
    p.add_argument("--no-ort", action="store_true")
    p.add_argument("--no-micro", action="store_true", help="skip the micro-kernel alone")
    p.add_argument("--shapes", default="", help="K x N pairs, e.g. 768x3072,3072x768")
    args = p.parse_args()

    from refsim import backend
    from refsim.kernels import matmul as kmatmul
    from refsim.kernels.requant import requant_plan
    from refsim.ops.rounding import mode_code

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    rng = np.random.default_rng(0)
    print(f"M = {args.m}, {'int32 sums' if args.plain else 'requantized to int8'}; fastest of {args.repeats}")
    print(f"  {'K x N':>11} {'thr':>3} {'refsim GMAC/s':>13} {'ORT GMAC/s':>10} {'ratio':>6}")
    for k, n in shapes:
        a = rng.integers(-128, 128, (args.m, k)).astype(np.int8)
        b = rng.integers(-128, 128, (k, n))
        weight = kmatmul.PackedWeight.prepare(b)
        corr = weight.correction(-128, 0, None)
        plan = requant_plan(rng.integers(1 << 20, 1 << 21, n), 0, 24, 0, n)
        out_range = (-128, 127, mode_code("half_even"))
        if args.plain:
            run = lambda: weight.product(a, -128, corr)  # noqa: E731
        else:
            run = lambda: weight.product(a, -128, corr, plan, out_range, np.int8)  # noqa: E731
        check = weight.product(a, -128, corr)
        macs = args.m * k * n
        for threads in (1, 2):
            backend.set_threads(threads)
            ours = macs / fastest(run, args.repeats) / 1e9
            theirs = float("nan")
            if not args.no_ort:
                session = ort_session(b, threads)
                feed = {"a": (a.view(np.uint8) ^ np.uint8(0x80))}
                assert np.array_equal(session.run(None, feed)[0], check)  # the same product
                theirs = macs / fastest(lambda: session.run(None, feed), args.repeats) / 1e9
            print(f"  {k:>5}x{n:<5} {threads:>3} {ours:13.1f} {theirs:10.1f} {ours / theirs:6.2f}")
    backend.set_threads(1)
    if args.no_micro:
        return 0
    from refsim.kernels import vnni

    rate = micro_kernel_rate(args.repeats)
    print(f"micro-kernel alone ({vnni.MR} x {vnni.NR}, K = 256, in L1), one thread: {rate:.1f} GMAC/s = "
          f"{rate / 2.8 / 64:.2f} VPDPBUSD zmm per cycle at the nominal 2.8 GHz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
