"""Which implementation runs the hot kernels: Numba (default), plain NumPy, or the spec.

All give identical results. The NumPy path exists so every Numba kernel can be checked
against a second, simpler implementation, and for machines where Numba is unavailable.
Select with the REFSIM_BACKEND environment variable or `with refsim.backend.use("numpy")`.

"spec" is the NumPy path with integer products in exact float BLAS chunks (see
`refsim.ops.matmul`) instead of NumPy's slow int64 matmul: what a model runs while its
Numba kernels are not compiled yet (`refsim.warm`), so a first run never waits for the
compiler. It never loads Numba.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

from . import jit  # stdlib only until a kernel runs: Numba itself loads later

BACKENDS = ("numba", "numpy", "spec")

_current = os.environ.get("REFSIM_BACKEND", "numba")
if _current not in BACKENDS:
    _current = "numba"

# Numba is a declared dependency; fall back quietly only if it is not installed at all.
# (It is imported only when a kernel first runs: see refsim.jit.)
HAVE_NUMBA = importlib.util.find_spec("numba") is not None
if not HAVE_NUMBA:  # pragma: no cover - exercised only on broken installs
    _current = "numpy"


def current() -> str:
    return _current


def use_numba() -> bool:
    return _current == "numba"


@contextlib.contextmanager
def use(name: str):
    """Run the enclosed code with backend `name` ('numba' or 'numpy')."""
    global _current
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    if name == "numba" and not HAVE_NUMBA:
        raise RuntimeError("numba is not available")
    previous, _current = _current, name
    try:
        yield
    finally:
        _current = previous


# Numba's parallel kernels pay a fork/join on every call (about 28 us on this project's VM),
# and on a busy machine a join waits for whichever worker the OS descheduled (measured
# here: a MiniLM run took 5x longer with one core busy). So the engine picks, per step,
# one thread or all of them from what that step's recent runs cost (`ThreadChoice`);
# steps with less work than MEASURE_MIN_ELEMENTS always run on one thread.
MEASURE_MIN_ELEMENTS = int(os.environ.get("REFSIM_PARALLEL_MIN", 1 << 14))
_threads_set: int | None = None


def max_threads() -> int:
    return 1 if jit.sequential_only() else jit.materialize().config.NUMBA_NUM_THREADS


def set_threads(wanted: int) -> None:
    """Numba threads for the next kernels (cheap when unchanged); on one thread, parallel
    kernels run as their sequential twins (`jit.one_thread`)."""
    global _threads_set
    if HAVE_NUMBA:
        jit.one_thread(wanted == 1)
        if wanted != _threads_set:
            jit.materialize().set_num_threads(wanted)
            _threads_set = wanted


class ThreadChoice:
    """One step's choice between one thread and all: each option's cost is a running
    estimate of its recent runs; the cheaper one runs, and every PROBE-th run tries the
    other, so the choice follows the machine's load. Each option's first run is not
    counted: it pays for compiling its kernel (the parallel and the sequential twin are
    two kernels) or loading it from the cache, seconds against microseconds, which the
    running estimate would take hundreds of runs to forget (measured: MiniLM's every step
    stayed on one thread through a whole benchmark)."""

    PROBE = 16
    __slots__ = ("counts", "cost", "runs", "seen")

    def __init__(self, threads: int):
        self.counts = (1, threads)
        self.cost = [float("inf"), float("inf")]
        self.runs = 0
        self.seen = [0, 0]

    def pick(self) -> int:
        self.runs += 1
        if self.runs <= 4:  # try each option twice first
            return self.runs % 2
        best = 0 if self.cost[0] <= self.cost[1] else 1
        return 1 - best if self.runs % self.PROBE == 0 else best

    def record(self, option: int, seconds: float) -> None:
        self.seen[option] += 1
        if self.seen[option] == 1:  # the kernel's first run: compiling or loading it
            return
        old = self.cost[option]
        self.cost[option] = seconds if old == float("inf") else 0.75 * old + 0.25 * seconds


_blas_controller = None


@contextlib.contextmanager
def single_threaded_blas():
    """Keep BLAS (NumPy's OpenBLAS) on one thread while a model runs.

    BLAS worker threads spin after each call; beside Numba's worker threads on the same
    cores they slow both down (measured here: MiniLM batch 8 200 ms -> 164 ms, BERT-base
    154 ms -> 101 ms with BLAS on one thread). Refsim's large products run on AMX or VNNI
    on Numba threads, so BLAS loses little. Needs threadpoolctl; without it, a no-op.
    """
    global _blas_controller
    if _blas_controller is None:
        try:
            from threadpoolctl import ThreadpoolController

            _blas_controller = ThreadpoolController()
        except Exception:  # pragma: no cover - threadpoolctl is a declared dependency
            _blas_controller = False
    if not _blas_controller:
        yield
        return
    with _blas_controller.limit(limits=1, user_api="blas"):
        yield
