"""The cold start: a model's first run never waits for Numba to compile.

Compiling the kernels a transformer uses takes half a minute on a small machine, once per
user: the compiled code is kept in a per-user cache (`refsim.jit`). Until it is there, a
run computes the same integers with the ops' NumPy formulas (the "spec" backend, products
in exact float BLAS chunks), and a background process compiles the kernels into the cache:

- the first run of a Model in a process tries its Numba kernels without compiling any
  (`jit.no_compile()`: cached kernels load, and a missing one stops the attempt before
  anything is reported); if one is missing, the run is redone on the spec backend and a
  compile job is started for this model and these inputs' shapes;
- later runs use the spec until the job is done, then try the kernels again (between two
  batches of a data set, or in the next process). A job compiles both twins of every
  parallel kernel, so other input sizes find their kernels too;
- a job is a separate process (`python -m refsim.warm JOB_FOLDER`, its own session, low
  priority) that outlives a short `refsim run`; a lock file keeps two processes from
  starting the same job, and a crashed job's stale lock is taken over.

The results are identical either way (the spec is what every kernel is tested against).
REFSIM_COMPILE=now compiles in the foreground instead (the tests, steady-state
benchmarks), and `refsim warmup MODEL.intq` fills the cache ahead of time (lab machines,
images built once).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

MODES = ("background", "now")
MAX_JOBS = 3  # per model and process; after that a run compiles in the foreground
STALE_LOCK_S = 3600.0


_compiling_now = threading.local()  # set inside compile_for


def mode() -> str:
    """'background' (the default) or 'now' (REFSIM_COMPILE=now, and inside compile_for)."""
    if getattr(_compiling_now, "on", False):
        return "now"
    value = os.environ.get("REFSIM_COMPILE", "background")
    return value if value in MODES else "background"


def jobs_dir() -> Path:
    from .jit import _writable_cache_dir

    return _writable_cache_dir() / "refsim-jobs"


class ColdStart:
    """One model's state: kernels known ready, or the compile job it waits for."""

    def __init__(self):
        self.ready = False
        self.job: _Job | None = None
        self.jobs_started = 0

    def run(self, model, values: dict, keep: set, shapes, trace) -> None:
        """Run `model` like `Model._execute`, on its kernels if they are compiled, else on
        the spec while a background job compiles them."""
        from . import backend
        from .jit import NotCompiled, no_compile

        if self.ready or self.jobs_started >= MAX_JOBS:
            model._execute(values, keep, shapes, trace)
            return
        if self.job is None and not compiled_before(model):  # cold for sure: no need to load Numba to find out
            self._start(model, values)
        elif self.job is None or self.job.finished():
            attempt, bound = dict(values), dict(shapes.bound)
            seen: list = []
            try:
                with no_compile():
                    model._execute(attempt, keep, shapes, None if trace is None else lambda *a: seen.append(a))
            except NotCompiled:
                shapes.bound = bound
                self._start(model, values)
            else:
                self.ready = True
                values.clear()
                values.update(attempt)
                for call in seen:
                    trace(*call)
                return
        with backend.use("spec" if self.jobs_started < MAX_JOBS else "numba"):  # numba: no job could start
            model._execute(values, keep, shapes, trace)

    def _start(self, model, values: dict) -> None:
        self.jobs_started += 1
        try:
            self.job = _Job.start(model, {n: values[n] for n in model.graph.inputs})
        except OSError:  # no process can be started here (or the cache is not writable): compile now
            self.jobs_started = MAX_JOBS

    @staticmethod
    def backend_to_prepare(model) -> str:
        """The backend whose plan a new Model prepares: the spec's when its kernels were
        never compiled, so that loading it does not load Numba either."""
        from . import backend

        if backend.use_numba() and mode() == "background" and not compiled_before(model):
            return "spec"
        return backend.current()


def _model_key(model) -> str | None:
    if model.path is None:
        return None
    stat = os.stat(model.path)
    text = f"{os.path.abspath(model.path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def compiled_before(model) -> bool:
    """Whether a compile job (or `refsim warmup`) has finished for this model file: then its
    kernels are worth trying (they may still be missing for new input types)."""
    key = _model_key(model)
    return key is not None and (jobs_dir() / "compiled" / key).exists()


def _mark_compiled(model) -> None:
    key = _model_key(model)
    if key is not None:
        folder = jobs_dir() / "compiled"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / key).touch()


def _key(model, feeds: dict) -> str:
    """One job per model file (path, size, time) and input shapes."""
    h = hashlib.sha256()
    h.update((_model_key(model) or f"memory-{id(model.graph)}-{os.getpid()}").encode())
    for name, array in sorted(feeds.items()):
        h.update(f"\0{name}:{array.dtype.str}:{array.shape}".encode())
    return h.hexdigest()[:20]


class _Job:
    """A background compile for one model and its inputs' shapes."""

    def __init__(self, folder: Path, process: subprocess.Popen | None):
        self.folder, self.process = folder, process

    @classmethod
    def start(cls, model, feeds: dict) -> "_Job":
        folder = jobs_dir() / _key(model, feeds)
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / "lock"
        if not _take(lock):
            return cls(folder, None)  # another process runs this job: wait for its lock to go
        try:
            if model.path is not None:
                path = os.path.abspath(model.path)
            else:
                path = str(folder / "model.intq")
                model.save(path)
            for name, array in feeds.items():
                np.save(folder / f"{_file_name(name)}.npy", array, allow_pickle=False)
            (folder / "job.json").write_text(json.dumps({"model": path, "inputs": {n: _file_name(n) for n in feeds}}))
            env = {**os.environ, "REFSIM_COMPILE": "now"}
            with open(folder / "log", "wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "refsim.warm", str(folder)], env=env, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=True, close_fds=True,
                )
            lock.write_text(str(process.pid))
        except BaseException:
            lock.unlink(missing_ok=True)
            raise
        return cls(folder, process)

    def finished(self) -> bool:
        """The job's lock is gone (it removes the lock once its kernels are cached, before
        it exits), or its process died without removing it."""
        lock = self.folder / "lock"
        if self.process is not None:
            self.process.poll()  # reaps it once it has exited
        return not lock.exists() or _stale(lock)


def _file_name(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:16]  # input names may hold any character


def _take(lock: Path) -> bool:
    """Create the lock file (ours), or take over a stale one; False if a live job holds it."""
    for _ in range(2):
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return True
        except FileExistsError:
            if not _stale(lock):
                return False
            lock.unlink(missing_ok=True)
    return False


def _stale(lock: Path) -> bool:
    """A lock whose process is gone, or older than any compile takes."""
    try:
        text, age = lock.read_text().strip(), time.time() - lock.stat().st_mtime
    except OSError:
        return False
    if age > STALE_LOCK_S:
        return True
    if not text.isdigit():
        return age > 60  # being written by its launcher
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def running_jobs(folder: Path | None = None) -> list[Path]:
    """Folders of compile jobs still running (in `folder`, by default this user's)."""
    folder = jobs_dir() if folder is None else Path(folder)
    if not folder.is_dir():
        return []
    return [lock.parent for lock in folder.glob("*/lock") if not _stale(lock)]


def wait(timeout: float = 600.0, folder: Path | None = None) -> bool:
    """Wait until no compile job runs (in `folder`, by default this user's); False on timeout."""
    deadline = time.monotonic() + timeout
    while running_jobs(folder):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def compile_for(model, feeds: dict) -> None:
    """Compile (or load) every kernel `model` runs on feeds of these types and shapes,
    both twins of each parallel one, into the cache."""
    from . import backend
    from .jit import both_twins

    previous, _compiling_now.on = getattr(_compiling_now, "on", False), True
    try:
        with backend.use("numba"), both_twins():
            model.run(feeds)
        _mark_compiled(model)
    finally:
        _compiling_now.on = previous


def declared_feeds(model, dims: dict[str, int] | None = None, default: int = 8) -> dict[str, np.ndarray]:
    """Inputs of the declared types and shapes (symbolic dimensions from `dims`, else
    `default`), each filled with the value of its type closest to zero."""
    dims = dims or {}
    feeds = {}
    for t in model.inputs:
        shape = tuple(d if isinstance(d, int) else dims.get(d, default) if isinstance(d, str) else default for d in t.shape)
        feeds[t.name] = np.full(shape, min(max(0, t.dtype.lo), t.dtype.hi), t.dtype.storage)
    return feeds


def _job_main(folder: Path) -> int:
    """A compile job: the model on the saved inputs, then the lock goes."""
    try:
        os.nice(10)  # the foreground runs the spec meanwhile: let it have the cores
    except OSError:
        pass
    lock = folder / "lock"
    try:
        from .engine import load

        job = json.loads((folder / "job.json").read_text())
        model = load(job["model"])
        feeds = {name: np.load(folder / f"{stem}.npy", allow_pickle=False) for name, stem in job["inputs"].items()}
        started, cpu = time.perf_counter(), time.process_time()
        compile_for(model, feeds)
        took = {"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}
        (folder / "done").write_text(json.dumps(took) + "\n")
        return 0
    finally:
        for copy in [*folder.glob("*.npy"), folder / "model.intq"]:  # the inputs (and model) it was given
            copy.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)


if __name__ == "__main__":  # `python -m refsim.warm JOB_FOLDER`: run the package's copy of this module
    from refsim.warm import _job_main as job_main

    sys.exit(job_main(Path(sys.argv[1])))
