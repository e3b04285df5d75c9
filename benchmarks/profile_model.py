"""Where a refsim run spends its time: per-step kernel timings, fastest of N runs.

    python benchmarks/profile_model.py [--model minilm] [--batch 1] [--repeats 30] [--trace]

Each step's kernel is wrapped with a timer; a step's time is the fastest of its N runs (the
machine is shared: the minimum is the least disturbed), summed per kind of step (a fused
step is named "Producer+Consumer"). "engine loop" is the smallest, over the runs, of a run's
time minus its kernels' times: the engine's own per-step work (checks, thread
choice, the trace callback). `--trace` profiles a run that keeps every tensor. `--cpu` runs
on one thread and counts CPU time: on a shared machine, the one measure the load leaves alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _timed(kernel, slot: list, clock):

    def run(*args, **kwargs):
        t = clock()
        result = kernel(*args, **kwargs)
        slot.append(clock() - t)
        return result

    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--trace", action="store_true", help="keep every tensor, as `refsim golden` does")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--cpu", action="store_true",
                   help="one thread, timed in CPU seconds of this thread: what a step costs, whatever the machine's load")
    args = p.parse_args()
    if args.cpu:
        os.environ["NUMBA_NUM_THREADS"] = "1"  # read when Numba loads
    clock = time.thread_time if args.cpu else time.perf_counter

    import models
    import refsim
    import refsim.kernels  # noqa: F401

    m = refsim.load(models.refsim_intq(args.model))
    feeds = {k: v for k, v in models.text_feeds(args.batch).items() if k in {t.name for t in m.inputs}}
    kept: list = []
    trace = (lambda node, name, array: kept.append(array)) if args.trace else None

    def run():
        kept.clear()
        m.run(feeds, trace=trace)

    for _ in range(3):  # compile, and let every step's thread choice settle
        run()
    plain = []
    for _ in range(args.repeats):
        t = clock()
        run()
        plain.append(clock() - t)

    steps = m._steps
    slots = [[] for _ in steps]
    originals = [s.kernel for s in steps]
    for s, slot in zip(steps, slots):
        s.kernel = _timed(s.kernel, slot, clock)
    totals = []
    try:
        for _ in range(args.repeats):
            t = clock()
            run()
            totals.append(clock() - t)
    finally:
        for s, k in zip(steps, originals):
            s.kernel = k

    fastest = [min(slot) for slot in slots]
    by_kind: dict[str, list[float]] = defaultdict(list)
    for s, f in zip(steps, fastest):
        kind = s.node.op if s.producer is None else f"{s.producer.op}+{s.node.op}"
        by_kind[kind].append(f)
    best = min(plain)
    print(f"{args.model} b{args.batch}{' trace' if args.trace else ''}: fastest run {best * 1e3:.2f} ms, "
          f"median {sorted(plain)[len(plain) // 2] * 1e3:.2f} ms over {args.repeats}; {len(steps)} steps; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"  {'step kind':32} {'count':>5} {'ms':>8} {'share':>6}")
    rows = sorted(by_kind.items(), key=lambda kv: -sum(kv[1]))
    for kind, times in rows[: args.top]:
        print(f"  {kind:32} {len(times):5d} {sum(times) * 1e3:8.3f} {sum(times) / best * 100:5.1f}%")
    # Per run: its time minus its own kernels' times; the least disturbed run's.
    loop = min(total - sum(slot[r] for slot in slots) for r, total in enumerate(totals))
    print(f"  {'sum of the fastest steps':32} {'':5} {sum(fastest) * 1e3:8.3f}")
    print(f"  {'engine loop (run - kernels)':32} {'':5} {loop * 1e3:8.3f} {loop / best * 100:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
