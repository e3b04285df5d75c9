"""Numba, loaded only when a kernel first runs: `import refsim` stays fast.

The op modules write `from ..jit import njit, prange, vectorize` instead of importing them
from numba. The decorators here record the function and its options and return a stand-in;
the first call of any stand-in (or `materialize()`, which the kernel package calls when a
model is prepared) imports Numba once, sets it up (below), builds every real dispatcher
(compiling nothing yet), and puts them in place of the stand-ins in refsim's modules, so
that compiled code calling another jitted function finds a Numba dispatcher, and `prange`
is Numba's. A ufunc (`vectorize` with signatures compiles when built) is built at its own
first call; ufuncs are only called from Python.

Numba's setup, done before it first loads:
- compiled kernels are cached in a per-user folder (`$REFSIM_CACHE_DIR/numba`, else
  `$XDG_CACHE_HOME/refsim/numba`, else `~/.cache/refsim/numba`), in a subfolder named
  after a digest of the sources holding compiled code (`source_fingerprint`), never in the package
  folder, which may be read-only; NUMBA_CACHE_DIR, when set, wins;
- the threading layer is Numba's default choice (TBB when its library loads, else OpenMP,
  else its own `workqueue`) unless NUMBA_THREADING_LAYER says otherwise. `workqueue` made
  a MiniLM run 1.5x slower than OpenMP or TBB here (its fork/join costs more per kernel).
  GNU OpenMP is not fork-safe: a child forked after a parallel kernel ran would hang
  (Numba kills it instead). So a process forked after that runs every kernel as its
  sequential twin (`sequential_only()`), which is exact and, in worker processes that
  already split the work between them, the right choice anyway. OpenMP and TBB are
  thread-safe; `workqueue` is not.

Two switches serve the cold start (`refsim.warm`): inside `no_compile()`, a kernel that
would have to be compiled now (its types are neither compiled in this process nor in the
on-disk cache) raises `NotCompiled` instead, so the engine can run the spec meanwhile; and
inside `both_twins()` a parallel kernel also compiles its other twin for the same types,
so a model's kernels are ready whatever sizes its later inputs have.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import tempfile
import threading
import types
from pathlib import Path

_lock = threading.RLock()
_stand_ins: list[_Deferred] = []
_numba = None
_switches = threading.local()  # .no_compile, .both_twins, .one_thread: per thread, as Numba compiles in the caller's


class NotCompiled(Exception):
    """A kernel would be compiled now, inside `no_compile()`."""


@contextlib.contextmanager
def _switched_on(name: str):
    """Turn this thread's switch `name` on for a `with` block, restoring it after."""
    previous = getattr(_switches, name, False)
    setattr(_switches, name, True)
    try:
        yield
    finally:
        setattr(_switches, name, previous)


def no_compile():
    """Kernels that are neither compiled nor cached raise NotCompiled instead of compiling."""
    return _switched_on("no_compile")


def both_twins():
    """A parallel kernel compiles its sequential twin too (and the other way round)."""
    return _switched_on("both_twins")


def one_thread(on: bool) -> None:
    """Whether the next parallel kernels this thread calls run on one thread: then they run
    as their sequential twins, which compute the same without the parallel launch (about
    20 us a call here: a Requant of 49k values took 62 us as the parallel kernel on one
    thread, 38 us as its twin). Set by `backend.set_threads`."""
    _switches.one_thread = on


def kernel_threads() -> int:
    """How many threads the next parallel kernel this thread calls runs on: 1 inside
    `one_thread` or `sequential_only` (its sequential twin), else Numba's thread count.
    Kernels that shape their tasks by it take it as an argument (reading Numba's count
    inside compiled code would stop Numba caching the kernel: a dynamic global)."""
    if _sequential_only or getattr(_switches, "one_thread", False):
        return 1
    return materialize().get_num_threads()


def _guarded(dispatcher):
    """`dispatcher`, refusing to compile inside `no_compile()`. Numba calls its compiler
    only after the on-disk cache had nothing for these types, so a cached kernel still
    loads."""
    compiler = dispatcher._compiler
    compile_now = compiler.compile

    def compile(args, return_type):
        if getattr(_switches, "no_compile", False):
            raise NotCompiled(f"{dispatcher.py_func.__qualname__}{tuple(args)}")
        return compile_now(args, return_type)

    compiler.compile = compile
    return dispatcher


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """A digest of refsim's compiled source files. Numba checks a cached kernel against its own
    file only, so a kernel that inlines a function from another file (every fused kernel
    calls `requant_one` from kernels/requant.py) would keep running the old code after that
    file changed: an editable install, or an upgrade that left a file's stamp. Kernels are
    cached under this digest, so any change to those sources starts a fresh cache."""
    return sources_digest(Path(__file__).resolve().parent, _COMPILED_SOURCES)


# Every file holding jitted code (ops/, kernels/, this module), and dtypes.py, whose
# constants compiled code may capture; editing the engine or the CLI keeps the cache.
_COMPILED_SOURCES = ("jit.py", "dtypes.py", "ops/**/*.py", "kernels/**/*.py")


def sources_digest(folder: Path, patterns=("**/*.py",)) -> str:
    """16 hex digits of SHA-256 over the files under `folder` that match `patterns`:
    their names and contents."""
    digest = hashlib.sha256()
    for path in sorted({p for pattern in patterns for p in folder.glob(pattern)}):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where compiled kernels are kept between processes (per state of the sources:
    `source_fingerprint`)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    if os.environ.get("REFSIM_CACHE_DIR"):
        return Path(os.environ["REFSIM_CACHE_DIR"]) / "numba" / source_fingerprint()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "refsim" / "numba" / source_fingerprint()


def _writable_cache_dir() -> Path:
    """cache_dir(), or a per-user temporary folder when that cannot be written (a
    read-only home): Numba refuses to run a cached function it cannot cache."""
    preferred = cache_dir()
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"refsim-numba-{user}" / source_fingerprint()


def configure() -> None:
    """Settings Numba reads when it loads (harmless if it already has)."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(_writable_cache_dir()))
    if "numba" in sys.modules:  # loaded by someone else first: set what can still be set
        import numba

        numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


def _threads_launched(numba) -> bool:
    from numba.np.ufunc import parallel

    return bool(getattr(parallel, "_is_initialized", False))


_sequential_only = False


def sequential_only() -> bool:
    """True in a process forked after GNU OpenMP's threads started: parallel kernels
    must not run here (see the module docstring)."""
    return _sequential_only


def forked_children_run_sequential() -> bool:
    """Whether a process forked now would have to run sequential twins only (GNU
    OpenMP's threads have started here)."""
    if _numba is None or not _threads_launched(_numba) or _numba.threading_layer() != "omp":
        return False
    from numba.np.ufunc import omppool

    return getattr(omppool, "openmp_vendor", "GNU") == "GNU"


@contextlib.contextmanager
def sequential_kernels():
    """Run the enclosed code on sequential twins only (as a forked child will); compiles
    them here, once, instead of in every child."""
    global _sequential_only
    previous, _sequential_only = _sequential_only, True
    try:
        yield
    finally:
        _sequential_only = previous


def run_sequential_only() -> None:
    """From now on this process runs every kernel as its sequential twin (a worker process
    that shares the work with others)."""
    global _sequential_only
    _sequential_only = True


def _after_fork_in_child() -> None:
    if forked_children_run_sequential():
        run_sequential_only()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Deferred:
    """A jitted function before Numba has loaded."""

    def __init__(self, kind: str, args: tuple, kwargs: dict, fn):
        self.kind, self.args, self.kwargs, self.py_func = kind, args, kwargs, fn
        self.real = None
        self.__name__ = getattr(fn, "__name__", kind)
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn

    def build(self, numba):
        if self.real is None:
            decorator = getattr(numba, self.kind)
            self.real = decorator(*self.args, **self.kwargs)(self.py_func)
            if self.kind == "njit":
                _guarded(self.real)
                if self.kwargs.get("parallel") is True:
                    sequential = decorator(*self.args, **{**self.kwargs, "parallel": False})(_renamed(self.py_func, "_sequential"))
                    self.real = _Twin(self.real, _guarded(sequential))
        return self.real

    def __call__(self, *args, **kwargs):
        numba = materialize()
        return self.build(numba)(*args, **kwargs)

    def __repr__(self):
        return f"<refsim deferred {self.kind} {self.__name__}>"


class _Twin:
    """A parallel kernel (`njit(parallel=True)`, called from Python only) and its
    sequential twin, each compiled on its first use. Work below the size the engine
    would ever spread over threads (`backend.MEASURE_MIN_ELEMENTS` elements in the
    first argument, every such kernel's input) runs the sequential one: compiling a
    parallel kernel costs two to three times as much, and small models and most tests
    never need it. So does work the engine runs on one thread (`one_thread`)."""

    def __init__(self, parallel, sequential):
        from .backend import MEASURE_MIN_ELEMENTS

        self.parallel, self.sequential, self.threshold = parallel, sequential, MEASURE_MIN_ELEMENTS
        self.__name__ = parallel.py_func.__name__
        self.__doc__ = parallel.py_func.__doc__
        self.__wrapped__ = parallel.py_func

    def __call__(self, first, *rest):
        chosen, other = self.parallel, self.sequential
        if getattr(first, "size", 0) < self.threshold or _sequential_only or getattr(_switches, "one_thread", False):
            chosen, other = other, chosen
        if getattr(_switches, "both_twins", False):
            other.compile(tuple(other.typeof_pyval(a) for a in (first, *rest)))
        return chosen(first, *rest)


def _renamed(fn, suffix: str):
    """A copy of `fn` under another qualified name: Numba names its cache files after it,
    so the twins do not overwrite each other's compiled code."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__module__ = fn.__module__
    copy.__doc__ = fn.__doc__
    return copy


class _Prange:
    """Stands for numba.prange until Numba loads (a plain range if called before)."""

    def __call__(self, *args):
        return range(*args)


prange = _Prange()


def _decorator(kind: str):
    def decorator(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs and kind == "njit":
            return _register(_Deferred(kind, (), {}, args[0]))
        return lambda fn: _register(_Deferred(kind, args, kwargs, fn))

    decorator.__name__ = kind
    return decorator


def _register(stand_in: _Deferred) -> _Deferred:
    with _lock:
        if _numba is not None and stand_in.kind == "njit":  # Numba is up: no stand-in needed
            return stand_in.build(_numba)
        _stand_ins.append(stand_in)
    return stand_in


njit = _decorator("njit")
vectorize = _decorator("vectorize")


def materialize():
    """Load Numba and put real dispatchers in place of every stand-in."""
    global _numba
    if _numba is not None:
        return _numba
    with _lock:
        if _numba is not None:
            return _numba
        configure()
        import numba

        # njit builds nothing yet. A ufunc (vectorize with signatures) compiles when
        # built, so it is built on its first call (ufuncs are called from Python only).
        for stand_in in _stand_ins:
            if stand_in.kind == "njit":
                stand_in.build(numba)
        _replace_stand_ins(numba)
        _numba = numba
    return numba


def _replace_stand_ins(numba) -> None:
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "refsim" or name.startswith("refsim.")):
            continue
        namespace = vars(module)
        for key, value in list(namespace.items()):
            if isinstance(value, _Deferred) and value.real is not None:
                namespace[key] = value.real
            elif isinstance(value, _Prange):
                namespace[key] = numba.prange
