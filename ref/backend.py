"""Which implementation runs the hot kernels: Numba (default) or plain NumPy.

Both give identical results; the NumPy path exists so every Numba kernel can be checked
against a second, simpler implementation, and for machines where Numba is unavailable.
Select with the REFSIM_BACKEND environment variable or `with refsim.backend.use("numpy")`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

BACKENDS = ("numba", "numpy")

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


# Numba's parallel kernels pay a fork/join on every call, and on a busy machine a join
# waits for whichever worker the OS descheduled: measured here, a MiniLM run took 5x longer
# with one core busy. Small work therefore runs on one thread; work of at least
# PARALLEL_MIN_ELEMENTS elements gets every core. (REFSIM_PARALLEL_MIN overrides it.)
PARALLEL_MIN_ELEMENTS = int(os.environ.get("REFSIM_PARALLEL_MIN", 1 << 18))
_threads_set: int | None = None


def fit_threads(elements: int) -> None:
    """Give the next Numba kernels one thread for small work, all threads for large."""
    if HAVE_NUMBA:
        _set_threads(max_threads() if elements >= PARALLEL_MIN_ELEMENTS else 1)


def max_threads() -> int:
    from .jit import materialize

    return materialize().config.NUMBA_NUM_THREADS


def _set_threads(wanted: int) -> None:
    global _threads_set
    if wanted != _threads_set:
        from .jit import materialize

        materialize().set_num_threads(wanted)
        _threads_set = wanted


@contextlib.contextmanager
def all_threads_if(large: bool):
    """Within the block, every Numba thread when `large` (a kernel that knows its work is
    big though its inputs are small, like a matrix product); as before otherwise."""
    if not (HAVE_NUMBA and large):
        yield
        return
    from .jit import materialize

    before = materialize().get_num_threads()
    _set_threads(max_threads())
    try:
        yield
    finally:
        _set_threads(before)


_blas_controller = None


@contextlib.contextmanager
def single_threaded_blas():
    """Keep BLAS (NumPy's OpenBLAS) on one thread while a model runs.

    BLAS worker threads spin after each call; beside Numba's worker threads on the same
    cores they slow both down (measured here: MiniLM batch 8 200 ms -> 164 ms, BERT-base
    154 ms -> 101 ms with BLAS on one thread). Refsim's large products run on AMX or on
    Numba threads, so BLAS loses little. Needs threadpoolctl; without it, a no-op.
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
