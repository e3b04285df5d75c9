"""Running an integer graph: a thin loop over a plan prepared at load time.

The engine knows no op by name. Preparing a node picks its kernel: the first registered
fast kernel that applies (`refsim.kernels`), else the op's own prepared kernel, else the
op's formula. Then a fusion pass lets a kernel absorb the first reader of its output when
that node takes nothing else computed (a weight product and the Requant after it run as
one pass over each block while it is in cache). A fused step returns the intermediate it
skips when asked, so a traced run sees every tensor exactly as an unfused one; when other
nodes read that intermediate too, only a kernel that always returns it may fuse (a
LayerNorm, whose output the residual branch reads, and its Requant).

For each step the engine calls the kernel, checks that the result has the declared storage
type and shape, hands it to the trace callback, and frees intermediates after their last
use. Symbolic dimensions ("batch", "seq") are bound from the feeds and must stay
consistent through the whole run.
"""

from __future__ import annotations

import functools
import mmap
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from . import backend, warm
from .dtypes import check_fits
from .errors import InputError, OpError, RefsimError, internal_error
from .ir import Graph, Node, Tensor, validate
from .ops import registry

TraceFn = Callable[[Node, str, np.ndarray], None]


@dataclass
class _Step:
    node: Node
    kernel: Callable
    inputs: list[str]
    outputs: list[Tensor]
    release: list[str]  # values no later node needs
    computed: list[int]  # positions of inputs that are not constants (they size the work)
    # A fused step: the producer node and the output of it that the kernel returns only
    # when asked (kernel(*inputs, keep=True) -> (hidden, output)).
    producer: Node | None = None
    hidden: Tensor | None = None
    threads: backend.ThreadChoice | None = None  # None: always one thread
    shared: bool = False  # later steps read the hidden output too: always ask for it


class _Shapes:
    """Binds symbolic dimensions to sizes during one run."""

    def __init__(self):
        self.bound: dict[str, int] = {}
        # Declared shapes already matched, with the shape they matched: the same pair
        # again binds nothing new (most tensors of a run share a few shapes).
        self.matched: dict[tuple, tuple] = {}

    def match(self, declared: tuple, actual: tuple) -> str | None:
        """None if `actual` fits `declared` (binding new symbols), else a reason."""
        known = type(declared) is tuple
        if known and self.matched.get(declared) == actual:
            return None
        problem = self._match(declared, actual)
        if problem is None and known:
            self.matched[declared] = actual
        return problem

    def _match(self, declared: tuple, actual: tuple) -> str | None:
        if len(declared) != len(actual):
            return f"rank {len(actual)} instead of {len(declared)}"
        for axis, (d, a) in enumerate(zip(declared, actual)):
            if d is None:
                continue
            if isinstance(d, str):
                if self.bound.setdefault(d, a) != a:
                    return f"dimension {axis} ({d!r}) is {a} but {d!r} = {self.bound[d]} elsewhere"
            elif d != a:
                return f"dimension {axis} is {a} instead of {d}"
        return None


class Model:
    """A loaded integer graph, ready to run: `outputs = model.run({"x": array})`."""

    def __init__(self, graph: Graph, path: str | None = None, fuse: bool = True):
        self.graph = graph
        self.path = path
        self.fuse = fuse
        self.order = validate(graph)
        self._plans: dict[str, list[_Step]] = {}
        self._constants: dict[str, np.ndarray] | None = None  # name -> data, gathered on the first run
        self._cold = warm.ColdStart()  # runs the spec while kernels compile (refsim.warm)
        with backend.use(self._cold.backend_to_prepare(self)):
            self._steps  # noqa: B018  (prepare now, before the file's pages are dropped)
        _drop_resident_pages(graph)

    @property
    def _steps(self) -> list[_Step]:
        """The plan for the current backend (kernels are chosen per backend)."""
        name = backend.current()
        if name not in self._plans:
            self._plans[name] = self._plan(self.fuse)
        return self._plans[name]

    def __reduce__(self):
        """A Model pickles as its file's path (Ray, Dask and spawned processes reopen the
        memory map on the other side); one built in memory must be saved first."""
        if self.path is None:
            raise TypeError("a refsim.Model built in memory cannot be pickled; save() it and load() the file")
        return (load, (self.path, True, self.fuse))

    # --- description -------------------------------------------------------------------

    @property
    def inputs(self) -> list[Tensor]:
        return [self.graph.tensors[n] for n in self.graph.inputs]

    @property
    def outputs(self) -> list[Tensor]:
        return [self.graph.tensors[n] for n in self.graph.outputs]

    @property
    def metadata(self) -> dict[str, Any]:
        return self.graph.metadata

    # --- the float edges (refsim.boundary: exported and imported models alike) -------------

    def quantize_inputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Float feeds quantized by the recorded input boundary; integer feeds unchanged."""
        from .boundary import quantize_feeds

        return quantize_feeds(self, feeds)

    def dequantize_outputs(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs with a known scale as float32 (q - zero_point) * scale, keyed as `run`
        returns them; others unchanged."""
        from .boundary import dequantize_tensors

        return dequantize_tensors(self, outputs)

    def __repr__(self) -> str:
        ins = ", ".join(f"{t.name}: {t.dtype}{list(t.shape)}" for t in self.inputs)
        outs = ", ".join(f"{t.name}: {t.dtype}{list(t.shape)}" for t in self.outputs)
        return f"<refsim.Model {self.graph.name!r} ({ins}) -> ({outs}), {len(self.order)} nodes>"

    # --- preparation -------------------------------------------------------------------

    def _plan(self, fuse: bool) -> list[_Step]:
        if backend.use_numba():
            from . import kernels  # loads Numba
        tensors = self.graph.tensors
        steps = []
        for node in self.order:
            schema = registry.lookup(node.op, node)
            attrs = schema.full_attrs(node.attrs)
            consts = {i: tensors[n].data for i, n in enumerate(node.inputs) if n and tensors[n].is_const}
            declared = [tensors[n] if n else None for n in node.inputs]
            kernel = kernels.choose(node.op, attrs, consts, declared) if backend.use_numba() else None
            if kernel is None and schema.prepare is not None:
                kernel = schema.prepare(attrs, consts, declared)
            if kernel is None:
                kernel = _bind(schema.fn, attrs)
            outputs = [tensors[n] for n in node.outputs]
            computed = [i for i, n in enumerate(node.inputs) if n and not tensors[n].is_const]
            steps.append(_Step(node, kernel, list(node.inputs), outputs, [], computed))
        if fuse:
            steps = self._fuse(steps)
        self._releases(steps)
        return steps

    def _fuse(self, steps: list[_Step]) -> list[_Step]:
        """Merge each step whose kernel can absorb the first reader of its single output (the
        only reader, unless the fused kernel always returns that output for the others)."""
        tensors = self.graph.tensors
        readers: dict[str, list[int]] = {}
        for index, step in enumerate(steps):
            for name in step.inputs:
                if name:
                    readers.setdefault(name, []).append(index)
        outputs = set(self.graph.outputs)
        absorbed: set[int] = set()
        merged = []
        for index, step in enumerate(steps):
            if index in absorbed:
                continue
            fused, shared = None, False
            if hasattr(step.kernel, "fuse") and len(step.outputs) == 1 and step.outputs[0].name not in outputs:
                name = step.outputs[0].name
                users = readers.get(name, [])
                shared = len(users) > 1
                for consumer_index in users:  # the first reader that this kernel can absorb
                    consumer = steps[consumer_index]
                    others = consumer.inputs[1:]
                    if (consumer_index in absorbed or consumer.inputs[0] != name or len(consumer.outputs) != 1
                            or any(n and not tensors[n].is_const for n in others)):
                        continue
                    args = [tensors[n].data if n else None for n in others]
                    run_consumer = functools.partial(_call_with, consumer.kernel, args)
                    fused = step.kernel.fuse(consumer.kernel, run_consumer)
                    # Other nodes read the output too: only a kernel that always returns it fuses.
                    if fused is not None and shared and not getattr(fused, "keeps_output", False):
                        fused = None
                    if fused is not None or not shared:
                        break
            if fused is None:
                merged.append(step)
                continue
            absorbed.add(consumer_index)
            merged.append(_Step(consumer.node, fused, step.inputs, consumer.outputs, [], step.computed,
                                producer=step.node, hidden=step.outputs[0], shared=shared))
        return merged

    def _releases(self, steps: list[_Step]) -> None:
        """Free every computed value after the last step that reads it."""
        tensors = self.graph.tensors
        last_use: dict[str, int] = {}
        for index, step in enumerate(steps):
            for name in step.inputs:
                if name:
                    last_use[name] = index
        for index, step in enumerate(steps):
            produced = [t.name for t in step.outputs] + ([step.hidden.name] if step.hidden is not None else [])
            for name in produced:  # produced but never read: free it straight away
                last_use.setdefault(name, index)
        keep = set(self.graph.outputs)
        for name, index in last_use.items():
            if name not in keep and not tensors[name].is_const:
                steps[index].release.append(name)

    # --- running -----------------------------------------------------------------------

    def check_feeds(self, feeds: Mapping[str, Any], shapes: _Shapes) -> dict[str, np.ndarray]:
        """Convert feeds to the declared storage types, or explain what is wrong."""
        if not isinstance(feeds, Mapping):
            raise InputError(f"feeds must map input names to arrays, got {type(feeds).__name__}")
        expected = set(self.graph.inputs)
        unknown = sorted(set(feeds) - expected)
        if unknown:
            raise InputError(f"unknown input(s) {unknown}; the model's inputs are {sorted(expected)}")
        missing = [n for n in self.graph.inputs if n not in feeds]
        if missing:
            raise InputError(f"missing input(s) {missing}; the model's inputs are {self.graph.inputs}")
        values = {}
        for name in self.graph.inputs:
            t = self.graph.tensors[name]
            array = np.asarray(feeds[name])
            if array.dtype.kind == "b":
                array = array.astype(np.uint8)
            if array.dtype.kind not in "iu":
                if (
                    array.dtype.kind == "f"
                    and np.all(np.abs(array) < 2.0**63)  # finite, and exact integers that int64 holds
                    and np.all(np.mod(array, 1) == 0)
                ):
                    array = array.astype(np.int64)
                else:
                    raise InputError(
                        f"input {name!r} must hold integers ({t.dtype}), got {array.dtype} values"
                    )
            problem = shapes.match(t.shape, array.shape)
            if problem:
                raise InputError(
                    f"input {name!r} has shape {list(array.shape)}, expected {list(t.shape)}: {problem}"
                )
            try:
                check_fits(array, t.dtype, f"input {name!r}")
            except RefsimError as e:
                raise InputError(str(e)) from None
            values[name] = np.asarray(array.astype(t.dtype.storage, copy=False), order="C")
        return values

    def run(
        self,
        feeds: Mapping[str, Any],
        trace: TraceFn | None = None,
        outputs: Iterable[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the graph on `feeds` (input name -> integer array).

        Returns the graph outputs (or the tensors named in `outputs`). `trace(node, name,
        array)` is called for every tensor a node produces, in execution order.
        """
        shapes = _Shapes()
        if self._constants is None:
            self._constants = {n: t.data for n, t in self.graph.tensors.items() if t.is_const}
        values: dict[str, np.ndarray] = dict(self._constants)
        values.update(self.check_feeds(feeds, shapes))
        wanted = list(self.graph.outputs if outputs is None else outputs)
        for name in wanted:
            if name not in self.graph.tensors:
                raise InputError(f"no tensor named {name!r} in the model")
        keep = set(wanted)
        _keep_freed_memory()
        with backend.single_threaded_blas():
            if backend.use_numba() and warm.mode() == "background":
                self._cold.run(self, values, keep, shapes, trace)
            else:
                self._execute(values, keep, shapes, trace)
        return {name: values[name] for name in wanted}

    def _execute(self, values, keep, shapes, trace) -> None:
        numba_backend = backend.use_numba()
        threads = backend.max_threads() if numba_backend else 1
        clock = time.perf_counter
        for step in self._steps:
            node = step.node
            args = [values[n] if n else None for n in step.inputs]
            choice = step.threads
            if choice is None and threads > 1 and max((args[i].size for i in step.computed), default=0) >= backend.MEASURE_MIN_ELEMENTS:
                choice = step.threads = backend.ThreadChoice(threads)
            option = choice.pick() if choice is not None else 0
            if numba_backend:
                backend.set_threads(choice.counts[option] if choice is not None else 1)
            hidden = step.hidden
            keep_hidden = hidden is not None and (step.shared or trace is not None or hidden.name in keep or not numba_backend)
            started = clock()
            try:
                if hidden is None:
                    result = step.kernel(*args)
                else:
                    inner, result = step.kernel(*args, keep=keep_hidden)
            except RefsimError as e:
                raise type(e)(f"{node.describe()}: {e}") from None
            except (ValueError, IndexError) as e:  # numpy's complaints about shapes the feeds caused
                raise OpError(f"{node.describe()}: {e}") from None
            except MemoryError:
                shapes_out = ", ".join(f"{t.name} {list(t.shape)}" for t in step.outputs)
                raise OpError(f"{node.describe()}: not enough memory to compute {shapes_out}") from None
            if choice is not None:
                choice.record(option, clock() - started)
            if keep_hidden:
                self._store(step.producer, hidden, inner, values, shapes, trace)
            results = result if isinstance(result, tuple) else (result,)
            if len(results) != len(step.outputs):
                raise internal_error(f"{node.describe()} returned {len(results)} results for {len(step.outputs)} outputs")
            for t, array in zip(step.outputs, results):
                self._store(node, t, array, values, shapes, trace)
            for name in step.release:
                if name not in keep:
                    values.pop(name, None)

    @staticmethod
    def _store(node, t: Tensor, array, values, shapes, trace) -> None:
        if array.dtype != t.dtype.storage:
            raise internal_error(
                f"{node.describe()} returned {array.dtype} for {t.name!r} "
                f"declared {t.dtype} (storage {t.dtype.storage})"
            )
        problem = shapes.match(t.shape, array.shape)
        if problem:
            raise OpError(
                f"{node.describe()}: output {t.name!r} has shape {list(array.shape)}, "
                f"declared {list(t.shape)}: {problem}"
            )
        values[t.name] = array
        if trace is not None:
            trace(node, t.name, array)

    def save(self, path: str | os.PathLike) -> None:
        from .intq import save

        save(self.graph, path)


_MALLOC_TUNED = False


def _keep_freed_memory() -> None:
    """Let glibc keep the memory a run frees, for the next one (once per process).

    A run frees each intermediate after its last reader; when glibc gives that memory back
    to the OS (the heap top beyond its trim threshold, and arrays of a few hundred KiB
    mmapped apart, each unmapped on free), the next run page-faults every page in again,
    zeroed by the kernel. MiniLM at batch 8 (int64 intermediates of 3 MB) took 28-39k page
    faults and 64-77 ms of system time per run, a third of its 200-210 ms on one thread
    (134-150 ms without them, the same peak RSS); a traced run, which frees nothing until
    the caller drops its tensors, page-faulted 46 MB per MiniLM run. Arrays below 16 MiB
    now come from the heap, which keeps up to 1 GiB of free space for reuse (a traced
    MiniLM batch 8 holds 450 MB; at 256 MiB its trace still cost 1.7x a plain run, at 1 GiB
    1.2x). The memory kept is what a run itself needed at its peak. Elsewhere than glibc:
    nothing."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 16 << 20)
    mallopt(m_trim_threshold, 1 << 30)


def _drop_resident_pages(graph: Graph) -> None:
    """Let the OS drop the file pages that loading and preparing touched (checksums, weight
    packing). Kernels that prepared their own copy of a constant never read the file
    again, and what is still read (embedding rows, say) comes back page by page."""
    mapping = graph.mapping
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def _call_with(kernel: Callable, constants: list, x):
    return kernel(x, *constants)


def _bind(fn: Callable, attrs: dict[str, Any]) -> Callable:
    def kernel(*inputs):
        return fn(*inputs, **attrs)

    return kernel


def load(path: str | os.PathLike, verify: bool = True, fuse: bool = True) -> Model:
    """Load an `.intq` file (memory-mapped) as a runnable Model.

    `verify` checks every tensor's CRC-32 at load time; turn it off only for files you
    produced yourself and trust. `fuse=False` runs every node as its own step (the
    results are the same; for comparing kernels).
    """
    from .intq import load_graph

    return Model(load_graph(path, verify=verify), path=os.fspath(path), fuse=fuse)
