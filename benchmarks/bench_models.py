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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _worker(engine: str, model: str, batch: int, repeats: int) -> dict:
    """Runs inside the subprocess: time one engine on one model."""
    import resource
    import time

    import numpy as np

    import models

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

    elif engine == "refsim":
        import refsim

        intq = models.refsim_intq(model)
        m = refsim.load(intq)
        names = {t.name for t in m.inputs}
        feeds = {k: v for k, v in feeds.items() if k in names}
        result["intq_bytes"] = os.path.getsize(intq)
        result["ideal_bytes"] = sum(
            t.dtype.bits * t.data.size / 8 for t in m.graph.tensors.values() if t.is_const
        )

        def run():
            return m.run(feeds)

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
    p.add_argument("--engines", default="refsim,ort-int8,ort-fp32,onnx-ref-qdq")
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
                + (f"  .intq {r['intq_bytes'] / 1e6:.2f} MB vs ideal {r['ideal_bytes'] / 1e6:.2f} MB" if "intq_bytes" in r else "")
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
