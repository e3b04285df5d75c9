"""Running a model over many samples: in batches, in worker processes, or on a Ray cluster.

    results = run_samples(model, samples, batch_size=16, workers=2)

`samples` are `refsim.inputs.Sample`s (as `refsim.inputs.load_samples` reads them); the
result is one dict of outputs per sample, in order, each exactly what `model.run` gives
for that sample alone. Batching stacks consecutive samples along axis 0, which is exact
when every model input and output has the same symbolic first dimension (the batch, as the
exporter declares it): each op then treats the rows of a batch independently. For other
models, samples run one at a time whatever `batch_size` says.

Workers: `workers=N` runs batches in N processes. On Linux they are forked from this one,
so they share the loaded model and the compiled kernels (with GNU OpenMP, which is not
fork-safe, they run sequential kernels, compiled here before the fork; see `refsim.jit`);
elsewhere they are spawned and reopen the model from its file
(a `refsim.Model` pickles as its path). `ray=ADDRESS` sends the batches to a Ray cluster
(`ray.init(address=ADDRESS)`; "local" starts one on this machine); each Ray worker opens the
model file, so the path must be readable there. Both need a model loaded from a file.
"""

from __future__ import annotations

import multiprocessing
import sys
from typing import Callable, Iterable, Sequence

import numpy as np

from . import jit
from .errors import InputError, RefsimError
from .inputs import Sample

Outputs = dict[str, np.ndarray]


def batch_dimension(model) -> str | None:
    """The symbol every input and output starts with, or None (batching is then off)."""
    tensors = model.graph.tensors
    firsts = {tensors[n].shape[0] if tensors[n].shape else None for n in [*model.graph.inputs, *model.graph.outputs]}
    if len(firsts) == 1:
        (first,) = firsts
        if isinstance(first, str):
            return first
    return None


def group(model, samples: Sequence[Sample], batch_size: int) -> list[list[int]]:
    """Indices of consecutive samples that run as one batch (same shapes past axis 0)."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if batch_dimension(model) is None:
        batch_size = 1
    groups: list[list[int]] = []
    key = None
    for index, sample in enumerate(samples):
        shapes = tuple(sorted((k, np.shape(v)[1:], np.asarray(v).dtype.str) for k, v in sample.feeds.items()))
        if groups and key == shapes and len(groups[-1]) < batch_size:
            groups[-1].append(index)
        else:
            groups.append([index])
            key = shapes
    return groups


def run_batch(model, feeds_list: list[dict[str, np.ndarray]], outputs: list[str] | None) -> list[Outputs]:
    """Run samples as one batch and split the outputs back, row counts as fed."""
    if len(feeds_list) == 1:
        return [model.run(feeds_list[0], outputs=outputs)]
    rows = [len(np.asarray(next(iter(f.values())))) for f in feeds_list]
    try:
        stacked = {name: np.concatenate([np.asarray(f[name]) for f in feeds_list]) for name in feeds_list[0]}
        result = model.run(stacked, outputs=outputs)
    except (RefsimError, ValueError, KeyError):  # let the sample at fault report itself
        return [model.run(feeds, outputs=outputs) for feeds in feeds_list]
    split = np.cumsum(rows)[:-1]
    per_sample = [dict() for _ in feeds_list]
    for name, array in result.items():
        for index, part in enumerate(np.split(array, split)):
            per_sample[index][name] = part
    return per_sample


def run_samples(
    model,
    samples: Sequence[Sample],
    *,
    batch_size: int = 1,
    workers: int = 1,
    ray: str | None = None,
    outputs: Iterable[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Outputs]:
    """Every sample's outputs, in order (see the module docstring). `progress(n)` is
    called as each batch of n samples finishes."""
    wanted = list(outputs) if outputs is not None else None
    groups = group(model, samples, batch_size)
    jobs = [[samples[i].feeds for i in g] for g in groups]
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if ray is not None:
        batches = _on_ray(model, jobs, wanted, ray)
    elif workers > 1 and len(jobs) > 1:
        batches = _in_processes(model, jobs, wanted, workers)
    else:
        batches = (run_batch(model, job, wanted) for job in jobs)
    results: list[Outputs] = []
    for batch in batches:
        results.extend(batch)
        if progress is not None:
            progress(len(batch))
    return results


# --- worker processes ------------------------------------------------------------------

_worker_model = None


def _init_worker(model) -> None:
    global _worker_model
    _worker_model = model
    # The workers split the work between them: threads inside each would only compete for
    # the same cores, and the sequential twins are the kernels the parent has loaded.
    jit.run_sequential_only()


def _worker_batch(job):
    feeds_list, wanted = job
    return run_batch(_worker_model, feeds_list, wanted)


def _in_processes(model, jobs, wanted, workers: int):
    if model.path is None:
        raise InputError("--workers needs a model loaded from a file")
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    first = None
    if method == "fork":
        # The children run sequential kernels (see refsim.jit and `_init_worker`): the first
        # batch runs on them here, so they are compiled or loaded from the cache once,
        # before the fork, not in every child (each child loading them itself took about
        # 2.5 s per child for MiniLM: 2 workers were slower than 1).
        with jit.sequential_kernels():
            first = run_batch(model, jobs[0], wanted)
        jobs = jobs[1:]
    context = multiprocessing.get_context(method)
    if first is not None:
        yield first
        if not jobs:
            return
    with context.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(model,)) as pool:
        yield from pool.imap(_worker_batch, [(job, wanted) for job in jobs])


# --- Ray --------------------------------------------------------------------------------


def _on_ray(model, jobs, wanted, address: str):
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'refsim[ray]'") from None
    if model.path is None:
        raise InputError("--ray needs a model loaded from a file")
    started = False
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        started = True
    try:
        remote = ray.remote(_ray_batch)
        pending = [remote.remote(model.path, model.fuse, job, wanted) for job in jobs]
        for ref in pending:
            yield ray.get(ref)
    finally:
        if started:
            ray.shutdown()


_opened: dict = {}


def _ray_batch(path, fuse, feeds_list, wanted):
    """One batch on a Ray worker, which opens each model file once."""
    if (path, fuse) not in _opened:
        from .engine import load

        _opened[(path, fuse)] = load(path, fuse=fuse)
    return run_batch(_opened[(path, fuse)], feeds_list, wanted)
