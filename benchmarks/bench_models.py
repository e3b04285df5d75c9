"""refsim against its peers on whole transformer models, in one run on this machine.

    python benchmarks/bench_models.py                 # everything (several minutes)
    python benchmarks/bench_models.py --quick         # MiniLM batch 1 only

For each model and batch size, every engine runs in its own subprocess (so peak memory
and thread pools are its own): onnxruntime on the float model, onnxruntime on its
`quantize_dynamic` int8 model, the onnx reference evaluator on a `quantize_static` QDQ
model, and refsim's integer model. Each reports the median latency over repeated runs
after warm-up, its first-run time (Numba JIT compilation and caches) separately, and its
peak resident memory. The table prints every latency as a ratio to refsim's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _worker(engine: str, model: str, batch: int, repeats: int) -> dict:
    """Runs inside the subprocess: time one engine on one model."""
    import resource
    import time

    import models
    import numpy as np

    feeds = models.text_feeds(batch)
    result: dict = {"engine": engine, "model": model, "batch": batch}
    t0 = time.perf_counter()
    if engine.startswith("ort"):
        import onnxruntime as ort

        path = models.float_onnx(model) if engine == "ort-fp32" else models.ort_dynamic_int8(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 2
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}

        def run():
            return session.run(None, feeds)

    elif engine == "onnx-ref-qdq":
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(str(models.ort_static_qdq(model)))
        names = set(evaluator.input_names)
        feeds = {k: v for k, v in feeds.items() if k in names}
        repeats = 1

        def run():
            return evaluator.run(None, feeds)

    elif engine in ("refsim", "refsim-trace"):
        import refsim

        intq = models.refsim_intq(model)
        result["rss_before_load_mb"] = _rss_mb()
        m = refsim.load(intq)
        names = {t.name for t in m.inputs}
        feeds = {k: v for k, v in feeds.items() if k in names}
        result["intq_bytes"] = os.path.getsize(intq)
        result["ideal_bytes"] = sum(
            t.dtype.bits * t.data.size / 8 for t in m.graph.tensors.values() if t.is_const
        )

        result["weights_mb"] = sum(t.data.nbytes for t in m.graph.tensors.values() if t.is_const) / 1e6
        result["live_activations_mb"] = _peak_live_bytes(m, feeds) / 1e6
        if engine == "refsim":
            def run():
                return m.run(feeds)
        else:  # what `refsim golden` captures: every tensor produced, kept
            def run():
                kept = []
                m.run(feeds, trace=lambda node, name, array: kept.append(array))
                return kept

    else:
        raise ValueError(engine)
    result["load_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    run()
    result["first_run_s"] = time.perf_counter() - t1
    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    result["median_s"] = float(np.median(times))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_live_bytes(m, feeds) -> int:
    """The most bytes of inputs and intermediates alive at once during a run (the engine
    frees each tensor after its last use)."""
    sizes = {}
    m.run(feeds, trace=lambda node, name, array: sizes.__setitem__(name, array.nbytes))
    live = sum(np.asarray(v).nbytes for v in feeds.values())
    peak = live
    for step in m._steps:
        live += sum(sizes.get(t.name, 0) for t in step.outputs)
        peak = max(peak, live)
        live -= sum(sizes.get(n, 0) for n in step.release)
    return peak


def measure(engine: str, model: str, batch: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, model, str(batch), str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"engine": engine, "model": model, "batch": batch, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="MiniLM batch 1 only")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--engines", default="refsim,refsim-trace,ort-int8,ort-fp32,onnx-ref-qdq")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        engine, model, batch, repeats = args.worker
        print(json.dumps(_worker(engine, model, int(batch), int(repeats))))
        return 0
    configs = [("minilm", 1)] if args.quick else [("minilm", 1), ("minilm", 8), ("bert-base", 1)]
    engines = args.engines.split(",")
    rows = []
    for model, batch in configs:
        results = {e: measure(e, model, batch, args.repeats) for e in engines}
        base = results.get("refsim", {}).get("median_s")
        for e, r in results.items():
            rows.append(r)
            if "error" in r:
                print(f"{model:10} b{batch}  {e:14} failed: {r['error']}")
                continue
            ratio = f"{r['median_s'] / base:7.2f}x" if base else "      -"
            print(
                f"{model:10} b{batch}  {e:14} {r['median_s'] * 1e3:9.2f} ms  ratio to refsim {ratio}  "
                f"first run {r['first_run_s']:6.2f} s  load {r['load_s']:5.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB"
            )
            if e == "refsim":
                grown = r["peak_rss_mb"] - r["rss_before_load_mb"]
                need = r["weights_mb"] + r["live_activations_mb"]
                print(f"{'':15}refsim memory: peak RSS grew {grown:.0f} MB from load on; weights {r['weights_mb']:.1f} MB "
                      f"+ largest live activation set {r['live_activations_mb']:.1f} MB = {need:.1f} MB "
                      f"(ratio {grown / need:.2f})")
                print(f"{'':15}.intq {r['intq_bytes'] / 1e6:.2f} MB vs ideal packed {r['ideal_bytes'] / 1e6:.2f} MB "
                      f"({(r['intq_bytes'] / r['ideal_bytes'] - 1) * 100:.1f}% over: tokenizer, header, per-channel scales)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
