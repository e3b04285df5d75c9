"""CPU time per run, one thread, refsim against onnxruntime int8: the one comparison a
busy machine leaves alone.

    python benchmarks/cpu_cost.py ENGINE MODEL BATCH [--repeats 10]

ENGINE is refsim or ort-int8. Each engine runs on one thread (refsim: NUMBA_NUM_THREADS=1;
onnxruntime: intra_op_num_threads=1) and each run is timed in CPU seconds of the process
(time.process_time), whose minimum over the repeats is printed: on a 2-core machine
shared with other jobs, wall-clock latencies of 2-thread runs measure the neighbours as
much as the engines (onnxruntime's spinning thread pool suffers most from them), while the
CPU a run takes on one thread barely moves. Run each engine in its own process, several
times, interleaved; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("engine", choices=["refsim", "ort-int8"])
    p.add_argument("model")
    p.add_argument("batch", type=int)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    os.environ["NUMBA_NUM_THREADS"] = "1"  # read when Numba loads
    os.environ.setdefault("REFSIM_COMPILE", "now")
    import models

    feeds = models.text_feeds(args.batch)
    if args.engine == "refsim":
        import refsim

        m = refsim.load(models.refsim_intq(args.model))
        names = {t.name for t in m.inputs}
        feeds = {k: v for k, v in feeds.items() if k in names}

        def run():
            m.run(feeds)
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(models.ort_dynamic_int8(args.model)), options,
                                       providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}

        def run():
            session.run(None, feeds)

    for _ in range(3):  # compile or load kernels, settle caches
        run()
    best = float("inf")
    for _ in range(args.repeats):
        t = time.process_time()
        run()
        best = min(best, time.process_time() - t)
    print(f"{args.engine} {args.model} b{args.batch}: {best * 1e3:.2f} ms CPU per run (one thread, fastest of "
          f"{args.repeats}); load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
