"""refsim against its peers on whole transformer models, in one run on this machine.

    python benchmarks/bench_models.py                 # everything (several minutes)
    python benchmarks/bench_models.py --quick         # MiniLM batch 1 only

For each model and batch size, every engine runs in its own subprocess (so peak memory
and thread pools are its own): onnxruntime on the float model, onnxruntime on its
`quantize_dynamic` int8 model, the onnx reference evaluator on a `quantize_static` QDQ
model, refsim's integer model, and refsim with a trace keeping every tensor (what
`refsim golden` captures). Each reports the median latency over repeated runs after
warm-up, its first run separately, and its peak resident memory. The engines take turns
over several rounds (`--rounds`, a new process each), so that a ratio is of times taken
minutes, not a quarter of an hour, apart.

Then, for MiniLM: the cold start (a new process with an empty kernel cache: imports,
loading and the first run, which runs the spec while a background job compiles; against
the same with the cache filled, and against compiling in the foreground), and samples per
second over a data set with 1 and 2 worker processes. The summary prints every target of
issue #14 as a ratio against the peer measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
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
        import refsim.kernels  # Numba and the kernel modules, loaded before the baseline

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
        result["threading_layer"] = None  # known once the first run has started Numba's threads
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
    if engine.startswith("refsim"):
        try:
            result["threading_layer"] = __import__("numba").threading_layer()
        except ValueError:  # no parallel kernel ran
            pass
    run()
    # Peak memory of the steady runs, apart from loading and compiling: reset the
    # high-water mark (Linux) and read it after the timed runs.
    result["first_peak_rss_mb"] = _status_mb("VmHWM")
    _reset_peak()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    result["median_s"] = float(np.median(times))
    result["peak_rss_mb"] = _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if engine.startswith("refsim"):
        result["live_activations_mb"] = _peak_live_bytes(m, feeds) / 1e6
        # Memory after compilation: a second copy of the model in this process reuses the
        # compiled kernels, so what it adds is its weights and activations alone.
        result["compiled_rss_mb"] = _rss_mb()
        second = refsim.load(intq)
        _reset_peak()
        for _ in range(3):
            second.run(feeds)
        result["second_copy_peak_mb"] = _status_mb("VmHWM") - result["compiled_rss_mb"]
    return result


def _reset_peak() -> None:
    """Reset the process's peak-RSS mark to its current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_live_bytes(m, feeds) -> int:
    """The most bytes of inputs and intermediates alive at once during a plain run (the
    engine frees each tensor after its last use; a fused step never materializes the
    intermediate it skips)."""
    sizes = {}
    m.run(feeds, trace=lambda node, name, array: sizes.__setitem__(name, array.nbytes))
    alive = {n: np.asarray(v).nbytes for n, v in feeds.items()}
    peak = sum(alive.values())
    for step in m._steps:
        for t in step.outputs:
            alive[t.name] = sizes.get(t.name, 0)
        peak = max(peak, sum(alive.values()))
        for name in step.release:
            alive.pop(name, None)
    return peak


def measure(engine: str, model: str, batch: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, model, str(batch), str(repeats)]
    env = {**os.environ, "REFSIM_COMPILE": "now"}  # steady state: the kernels, never the cold start's spec
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"engine": engine, "model": model, "batch": batch, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The engines a round does not repeat: the reference evaluator takes seconds a run, far
# from any ratio the noise of a shared machine could change.
ONCE = {"onnx-ref-qdq", "ort-fp32"}


def measure_rounds(engines: list[str], model: str, batch: int, repeats: int, rounds: int) -> dict:
    """Each engine in `rounds` interleaved rounds (a, b, c, a, b, c, ...), each round a new
    process: a machine's speed drifts over minutes (other tenants, clocks), and a ratio of
    two engines measured minutes apart carries that drift. An engine's median is the
    median of its rounds' medians; the other fields are its first round's."""
    per: dict = {}
    for round_index in range(rounds):
        for e in engines:
            if round_index and (e in ONCE or "error" in per.get(e, {})):
                continue
            r = measure(e, model, batch, repeats)
            if "error" in r:
                per[e] = r
                continue
            first = per.setdefault(e, {**r, "round_medians_s": []})
            first["round_medians_s"].append(r["median_s"])
            first["median_s"] = float(np.median(first["round_medians_s"]))
    return per


FIRST_RESULT = """
import json, sys, time
sys.path.insert(0, {here!r})
import models, refsim, refsim.warm
m = refsim.load({intq!r})
feeds = {{k: v for k, v in models.text_feeds(1).items() if k in {{t.name for t in m.inputs}}}}
out = m.run(feeds)
first = time.time()
import numpy as np
np.savez({out!r}, **out)
times = []
for _ in range(5):
    t = time.perf_counter(); m.run(feeds); times.append(time.perf_counter() - t)
print(json.dumps({{"first_result_at": first, "steady_run_s": sorted(times)[2], "kernels": refsim.warm.mode() == "now" or m._cold.ready}}))
"""


def _children_cpu() -> float:
    """CPU seconds used by finished child processes: unlike wall time, compile cost does
    not grow with the machine's load."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _first_result(code: str, env: dict) -> dict:
    """A new process to its first result (wall time from its launch), and its CPU time."""
    t, cpu = time.time(), _children_cpu()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    cpu = _children_cpu() - cpu
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**r, "process_s": r.pop("first_result_at") - t, "cpu_s": cpu}


def cold_start(model: str) -> dict:
    """The first run after `pip install` (a new process, empty kernel cache) to its first
    result: by default the spec runs while a background job compiles the kernels (timed to
    its end); then a new process with the cache that job filled; then, for comparison, an
    empty cache with REFSIM_COMPILE=now (compiling in the foreground, as before). The
    outputs of all three must be identical."""
    import models
    from refsim import warm

    intq = str(models.refsim_intq(model))
    result: dict = {}
    outputs = {}
    for kind, compile_mode in (("cold", "background"), ("warm", "background"), ("cold_now", "now")):
        if kind != "warm":
            cache = tempfile.mkdtemp(prefix="refsim-cold-")
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
        env.update(REFSIM_CACHE_DIR=cache, REFSIM_COMPILE=compile_mode)
        out = os.path.join(cache, f"{kind}.npz")
        started = time.time()
        r = _first_result(FIRST_RESULT.format(here=str(HERE), intq=intq, out=out), env)
        if "error" in r:
            return {"error": r["error"]}
        jobs = next(Path(cache).glob("numba/*/refsim-jobs"), Path(cache) / "numba" / "refsim-jobs")  # jit.cache_dir()
        if kind == "cold":
            warm.wait(3600, jobs)
            r["background_done_s"] = time.time() - started
            done = [json.loads(p.read_text()) for p in jobs.glob("*/done")]
            r["background_cpu_s"] = sum(d["cpu_s"] for d in done)
        with np.load(out, allow_pickle=False) as saved:
            outputs[kind] = {k: saved[k] for k in saved.files}
        result[kind] = r
        if kind != "cold":
            shutil.rmtree(cache, ignore_errors=True)
    result["identical"] = all(
        outputs[kind].keys() == outputs["cold"].keys()
        and all(np.array_equal(outputs[kind][k], v) and outputs[kind][k].dtype == v.dtype for k, v in outputs["cold"].items())
        for kind in ("warm", "cold_now")
    )
    return result


def _dataset_worker(model: str, count: int, workers: int) -> dict:
    import models
    import refsim
    from refsim.dataset import run_samples
    from refsim.inputs import load_samples

    m = refsim.load(models.refsim_intq(model))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(models.sentences(count)) + "\n")
    samples = load_samples(m, f.name)
    os.unlink(f.name)
    # Warm-up: compilation and thread choices; with workers, also the sequential twins the
    # forked workers run (loaded in this process before the fork, once): the timed run is
    # the steady rate, not the first compilation of those twins.
    run_samples(m, samples[:16], batch_size=8)
    if workers > 1:
        run_samples(m, samples[:24], batch_size=8, workers=workers)
    t = time.perf_counter()
    run_samples(m, samples, batch_size=8, workers=workers)
    return {"samples": len(samples), "workers": workers, "samples_per_s": len(samples) / (time.perf_counter() - t)}


def dataset_rate(model: str, count: int, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--dataset-worker", model, str(count), str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "REFSIM_COMPILE": "now"})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio_line(what: str, value: float | None, target: str, ok: bool | None) -> str:
    shown = "   -   " if value is None else f"{value:7.2f}"
    verdict = "" if ok is None else ("  met" if ok else "  MISSED")
    return f"  {what:58} {shown}   target {target}{verdict}"


def summary(results: dict, cold: dict | None, rates: list[dict]) -> list[str]:
    def median(model, batch, engine):
        return results.get((model, batch), {}).get(engine, {}).get("median_s")

    lines = ["", "targets (issue #14), ratios against peers measured in this run:"]
    for model in ("minilm", "bert-base"):
        r, o = median(model, 1, "refsim"), median(model, 1, "ort-int8")
        if r and o:
            lines.append(_ratio_line(f"{model} b1 latency, refsim / ORT int8", r / o, "<= 1.0 (minimum 1.5)", r / o <= 1.0))
    r, o = median("minilm", 8, "refsim"), median("minilm", 8, "ort-int8")
    if r and o:
        lines.append(_ratio_line("minilm b8 throughput, refsim / ORT int8", o / r, ">= 1.0", o / r >= 1.0))
    for (model, batch), per in results.items():
        r, t = per.get("refsim", {}).get("median_s"), per.get("refsim-trace", {}).get("median_s")
        if r and t:
            lines.append(_ratio_line(f"{model} b{batch} golden trace / plain run", t / r, "<= 1.5", t / r <= 1.5))
    for (model, batch), per in results.items():
        r, e = per.get("refsim", {}).get("median_s"), per.get("onnx-ref-qdq", {}).get("median_s")
        if r and e:
            lines.append(_ratio_line(f"{model} b{batch} speed-up over the onnx reference evaluator", e / r, ">= 50", e / r >= 50))
    for (model, batch), per in results.items():
        x = per.get("refsim", {})
        if "second_copy_peak_mb" in x:
            ratio = x["second_copy_peak_mb"] / (x["weights_mb"] + x["live_activations_mb"])
            lines.append(_ratio_line(f"{model} b{batch} peak memory after compilation / (weights + live activations)",
                                     ratio, "<= 1.5", ratio <= 1.5))
    if cold and "cold" in cold:
        c, w, n = cold["cold"], cold["warm"], cold["cold_now"]
        lines.append(_ratio_line("cold start: new process, empty cache, to first result (s)", c["process_s"], "", None))
        lines.append(_ratio_line("  the same with the kernel cache filled (s)", w["process_s"], "", None))
        lines.append(_ratio_line("  cold first result minus a warm process's (s)", c["process_s"] - w["process_s"], "<= 5 s",
                                 c["process_s"] - w["process_s"] <= 5))
        lines.append(_ratio_line("  cold first result minus a warm run (s)", c["process_s"] - w["steady_run_s"], "<= 5 s",
                                 c["process_s"] - w["steady_run_s"] <= 5))
        lines.append(_ratio_line("  background compile done, from the cold launch (s)", c["background_done_s"], "", None))
        lines.append(_ratio_line("  compiling in the foreground (REFSIM_COMPILE=now), to first result (s)", n["process_s"], "", None))
        lines.append(_ratio_line("  outputs identical, cold / warm / foreground compile", float(cold["identical"]), "1", cold["identical"]))
    good = [r for r in rates if "samples_per_s" in r]
    for r in good:
        lines.append(_ratio_line(f"minilm data set, {r['workers']} worker(s), batch 8: samples/s", r["samples_per_s"], "", None))
    if len(good) == 2:
        lines.append(_ratio_line("  scaling from 1 to 2 workers", good[1]["samples_per_s"] / good[0]["samples_per_s"], "", None))
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="MiniLM batch 1 only")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds per engine (a new process each); an engine's time is its rounds' median")
    p.add_argument("--engines", default="refsim,refsim-trace,ort-int8,ort-fp32,onnx-ref-qdq")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--dataset-worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        engine, model, batch, repeats = args.worker
        print(json.dumps(_worker(engine, model, int(batch), int(repeats))))
        return 0
    if args.dataset_worker:
        model, count, workers = args.dataset_worker
        print(json.dumps(_dataset_worker(model, int(count), int(workers))))
        return 0
    configs = [("minilm", 1)] if args.quick else [("minilm", 1), ("minilm", 8), ("bert-base", 1)]
    engines = args.engines.split(",")
    results = {}
    for model, batch in configs:
        per = results[(model, batch)] = measure_rounds(engines, model, batch, args.repeats, args.rounds)
        base = per.get("refsim", {}).get("median_s")
        for e, r in per.items():
            if "error" in r:
                print(f"{model:10} b{batch}  {e:14} failed: {r['error']}")
                continue
            ratio = f"{r['median_s'] / base:7.2f}x" if base else "      -"
            rounds = r["round_medians_s"]
            spread = f"  rounds {min(rounds) * 1e3:.2f}-{max(rounds) * 1e3:.2f}" if len(rounds) > 1 else ""
            print(
                f"{model:10} b{batch}  {e:14} {r['median_s'] * 1e3:9.2f} ms{spread}  ratio to refsim {ratio}  "
                f"first run {r['first_run_s']:6.2f} s  load {r['load_s']:5.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB"
            )
            if e == "refsim":
                grown = r["peak_rss_mb"] - r["rss_before_load_mb"]
                need = r["weights_mb"] + r["live_activations_mb"]
                print(f"{'':15}refsim memory: weights {r['weights_mb']:.1f} MB + largest live activation set "
                      f"{r['live_activations_mb']:.1f} MB = {need:.1f} MB; a second copy of the model, with the kernels "
                      f"compiled, peaked {r['second_copy_peak_mb']:.0f} MB above the RSS before it (ratio "
                      f"{r['second_copy_peak_mb'] / need:.2f}); the first copy, with loading the compiled code (compile memory), "
                      f"{grown:.0f} MB above the RSS before loading; threading layer {r.get('threading_layer')}")
                print(f"{'':15}.intq {r['intq_bytes'] / 1e6:.2f} MB vs ideal packed {r['ideal_bytes'] / 1e6:.2f} MB "
                      f"({(r['intq_bytes'] / r['ideal_bytes'] - 1) * 100:.1f}% over: tokenizer, header, per-channel scales)")
    cold = cold_start("minilm") if "refsim" in engines else None
    if cold and "cold" in cold:
        print(f"load average {os.getloadavg()[0]:.2f} at the end of the cold-start runs")
        for kind, what in (("cold", "empty kernel cache"), ("warm", "filled kernel cache"),
                           ("cold_now", "empty kernel cache, REFSIM_COMPILE=now")):
            c = cold[kind]
            print(f"refsim {what}: new process to first result {c['process_s']:.2f} s, CPU {c['cpu_s']:.2f} s, "
                  f"then a run takes {c['steady_run_s'] * 1e3:.1f} ms ({'kernels' if c['kernels'] else 'spec'})")
        c = cold["cold"]
        print(f"  background compile job: done {c['background_done_s']:.1f} s after the cold launch, CPU {c['background_cpu_s']:.1f} s")
    elif cold:
        print(f"cold start failed: {cold['error']}")
    rates = [dataset_rate("minilm", 64 if args.quick else 256, w) for w in (1, 2)] if "refsim" in engines else []
    for line in summary(results, cold, rates):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
