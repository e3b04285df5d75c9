"""Golden run vs plain run: what writing every intermediate tensor costs.

    .venv/bin/python benchmarks/bench_golden.py [--layers 4] [--seq 128] [--embed 256]

The model is a random integer transformer encoder in ITA form (docs/ITA.md: per-head
attention blocks from `add_attention_block`, then an int8 feed-forward layer with a
residual), built with the GraphBuilder because main ships no larger model. For one sample
it times, in the same process:

- plain:   `model.run(feeds)`                       (intermediates freed as it goes)
- capture: the run with the trace hook keeping every tensor (no files)
- golden:  `write_vector_set(..., targets npy)`     (every tensor as .npy + manifest, SHA-256)
- golden+memh: the same with the memh target as well

and prints each as a ratio to the plain run (target for golden: at most 3x), plus the
vector set's size on disk. The four are timed in turn, round after round, after one
warm-up (Numba JIT), so load from other processes affects all alike; medians and best
times are both shown.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from golden_helpers import ensure_ita_softmax, random_attention, random_requant  # noqa: E402
from refsim import GraphBuilder  # noqa: E402
from refsim.blocks.ita import add_attention_block  # noqa: E402
from refsim.golden.capture import capture  # noqa: E402
from refsim.golden.vectorset import write_vector_set  # noqa: E402
from refsim.hw_vectors import targets  # noqa: E402
from refsim.inputs import Sample  # noqa: E402


def build(layers: int, S: int, E: int, P: int, H: int, F: int, seed: int = 0):
    ensure_ita_softmax()
    rng = np.random.default_rng(seed)
    b = GraphBuilder("bench_encoder")
    x = b.input("x", "int8", [S, E])
    for layer in range(layers):
        att = add_attention_block(b, f"l{layer}.attn", x, x, random_attention(rng, E, P, H)).out
        w1 = b.const(rng.integers(-128, 128, (E, F)), "int8", name=f"l{layer}.ff1.W")
        b1 = b.const(rng.integers(-4096, 4096, F), "int32", name=f"l{layer}.ff1.B")
        acc = b.node("MatMul", [att, w1, None, None, b1], outputs=f"l{layer}.ff1.acc")
        rq = random_requant(rng, np.sqrt(E) * 32 * 74)
        h = b.node("Requant", [acc, b.const(rq.mul, "uint8"), b.const(rq.shift, "uint8")], outputs=f"l{layer}.ff1.out", dtype="int8")
        h = b.node("Relu", [h], outputs=f"l{layer}.ff1.relu")
        w2 = b.const(rng.integers(-128, 128, (F, E)), "int8", name=f"l{layer}.ff2.W")
        acc = b.node("MatMul", [h, w2], outputs=f"l{layer}.ff2.acc")
        rq = random_requant(rng, np.sqrt(F) * 16 * 74)
        y = b.node("Requant", [acc, b.const(rq.mul, "uint8"), b.const(rq.shift, "uint8")], outputs=f"l{layer}.ff2.out", dtype="int8")
        res = b.node("Add", [y, x], outputs=f"l{layer}.residual")
        x = b.node("Requant", [res, b.const(1, "uint8"), b.const(1, "uint8")], outputs=f"l{layer}.out", dtype="int8")
    b.output(x)
    return b.model()


def interleaved_times(fns: dict, repeat: int) -> dict[str, list[float]]:
    """Each function once per round, rounds repeated: load from other processes hits all alike."""
    for fn in fns.values():
        fn()  # warm-up: Numba compilation, page cache
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--embed", type=int, default=256)
    p.add_argument("--proj", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ff", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)
    model = build(args.layers, args.seq, args.embed, args.proj, args.heads, args.ff)
    x = np.random.default_rng(1).integers(-128, 128, (args.seq, args.embed)).astype(np.int8)
    sample = Sample({"x": x}, "random")
    work = Path(tempfile.mkdtemp(prefix="bench_golden."))
    try:
        counter = iter(range(10**6))

        def golden(names):
            def run():
                out = work / f"set{next(counter)}"
                write_vector_set(model, [sample], out, targets(names))
                shutil.rmtree(out)
            return run

        times = interleaved_times({
            "plain": lambda: model.run({"x": x}),
            "capture": lambda: capture(model, sample),
            "npy": golden("npy"),
            "memh": golden("npy,memh"),
        }, args.repeat)
        manifest = write_vector_set(model, [sample], work / "kept", targets("npy"))
        size = sum(f.stat().st_size for f in (work / "kept").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"model: {args.layers} layers, S={args.seq} E={args.embed} P={args.proj} H={args.heads} F={args.ff}; "
          f"{len(model.order)} nodes, {len(manifest['tensors'])} tensors captured")
    plain = statistics.median(times["plain"])
    best = min(times["plain"])
    labels = {"plain": "plain run", "capture": "run + trace capture", "npy": "golden (npy)", "memh": "golden (npy + memh)"}
    print(f"{'':22}{'median':>10}{'ratio':>8}{'best':>10}{'ratio':>8}")
    for name, label in labels.items():
        med, low = statistics.median(times[name]), min(times[name])
        note = "   (target <= 3x)" if name == "npy" else ""
        print(f"{label:22}{med * 1e3:8.1f}ms{med / plain:7.2f}x{low * 1e3:8.1f}ms{low / best:7.2f}x{note}")
    print(f"vector set on disk   {size / 1e6:8.2f} MB  ({len(manifest['files'])} files + manifest)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
