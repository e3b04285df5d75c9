"""Many samples: batches, worker processes and Ray give exactly what one-at-a-time runs
give; a Model pickles by path; a process forked after a run still runs; `import refsim`
and `refsim --version` stay free of Numba; compiled kernels go to a per-user cache."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from refsim import GraphBuilder, load
from refsim.dataset import batch_dimension, group, run_samples
from refsim.errors import InputError
from refsim.inputs import Sample

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "tiny_mlp.intq"


def _samples(count, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 4, count)  # samples of 1-3 rows each
    return [Sample({"x": rng.integers(-128, 128, (r, 16)).astype(np.int8)}, f"s{i}") for i, r in enumerate(rows)]


def _one_at_a_time(model, samples):
    return [model.run(s.feeds) for s in samples]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


@pytest.mark.parametrize("batch_size, workers", [(1, 1), (7, 1), (64, 1), (3, 2)])
def test_batches_and_workers_give_what_single_runs_give(batch_size, workers):
    model = load(MODEL)
    samples = _samples(40)
    done = []
    got = run_samples(model, samples, batch_size=batch_size, workers=workers, progress=done.append)
    _same(got, _one_at_a_time(model, samples))
    assert sum(done) == len(samples)


def test_grouping_keeps_order_and_shapes_apart():
    model = load(MODEL)
    samples = _samples(5) + [Sample({"x": np.zeros((2, 16), np.int16)}, "other dtype")]
    groups = group(model, samples, 4)
    assert [i for g in groups for i in g] == list(range(6))
    assert groups[-1] == [5] and max(len(g) for g in groups) <= 4
    with pytest.raises(InputError, match="batch-size"):
        group(model, samples, 0)


def test_a_model_without_a_batch_dimension_runs_one_sample_at_a_time():
    b = GraphBuilder("fixed")
    x = b.input("x", "int8", [2, 3])
    b.output(b.node("Relu", [x], outputs="y"))
    model = b.model()
    assert batch_dimension(model) is None
    samples = [Sample({"x": np.full((2, 3), v, np.int8)}, str(v)) for v in (-1, 2, 3)]
    assert group(model, samples, 16) == [[0], [1], [2]]
    _same(run_samples(model, samples, batch_size=16), _one_at_a_time(model, samples))


def test_model_pickles_by_path(tmp_path):
    model = load(MODEL)
    clone = pickle.loads(pickle.dumps(model))
    assert clone.path == model.path and clone is not model
    samples = _samples(3)
    _same(_one_at_a_time(clone, samples), _one_at_a_time(model, samples))
    in_memory = GraphBuilder("m")
    x = in_memory.input("x", "int8", [1])
    in_memory.output(in_memory.node("Relu", [x], outputs="y"))
    with pytest.raises(TypeError, match="save"):
        pickle.dumps(in_memory.model())


FORK_AFTER_RUN = """
import os, numpy as np, refsim, refsim.jit
from numba.np.ufunc import parallel
m = refsim.load({model!r})
# enough rows that the parent's steps run their parallel kernels on Numba's threads
x = np.random.default_rng(0).integers(-128, 128, (4096, 16)).astype(np.int8)
for _ in range(6):  # the engine tries one thread and all on each step
    before = m.run({{"x": x}})["logits"]
pid = os.fork()
if pid == 0:
    os._exit(0 if np.array_equal(m.run({{"x": x}})["logits"], before) else 3)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), parallel._is_initialized, refsim.jit.sequential_only())
"""


def test_a_process_forked_after_a_run_runs_the_model():
    """Whatever threading layer Numba picked (GNU OpenMP is not fork-safe), a child forked
    after the parent's parallel kernels ran gets the same results, and the parent itself
    keeps its threads."""
    result = subprocess.run([sys.executable, "-c", FORK_AFTER_RUN.format(model=str(MODEL))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0", "True", "False"], result.stderr[-2000:]


WORKERS_AFTER_THREADS = """
import numpy as np, refsim, refsim.jit as jit
from refsim.dataset import run_samples
from refsim.inputs import Sample
m = refsim.load({model!r})
m.run({{"x": np.ones((4096, 16), np.int8)}})  # the parent's parallel kernels start Numba's threads
rng = np.random.default_rng(5)
samples = [Sample({{"x": rng.integers(-128, 128, (r, 16)).astype(np.int8)}}, str(i)) for i, r in enumerate([1, 3, 2, 2, 1, 3])]
alone = [m.run(s.feeds)["logits"] for s in samples]
got = run_samples(m, samples, batch_size=2, workers=2)
import numba
gnu = numba.threading_layer() == "omp" and __import__("numba.np.ufunc.omppool", fromlist=["_"]).openmp_vendor == "GNU"
print(gnu, jit.forked_children_run_sequential(), all(np.array_equal(g["logits"], a) for g, a in zip(got, alone)), len(got))
"""


def test_workers_forked_after_the_parents_threads_started_give_the_same_results():
    """With GNU OpenMP the parent runs the first batch on the sequential kernels the
    children will run (compiling them once) and the children the rest; either way every
    sample's outputs are its own."""
    result = subprocess.run([sys.executable, "-c", WORKERS_AFTER_THREADS.format(model=str(MODEL))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    gnu, sequential, same, count = result.stdout.split()
    assert same == "True" and count == "6", result.stdout
    assert sequential == gnu  # with GNU OpenMP the path under test ran


def test_import_and_version_do_not_load_numba():
    code = "import sys, refsim, refsim.cli; print('numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False"]
    version = subprocess.run([sys.executable, "-m", "refsim", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("refsim ")


CACHE_PROBE = """
import numpy as np, refsim.jit as jit
numba = jit.materialize()
from refsim.ops.intmath import clz32
clz32(np.int64(5))
print(numba.config.CACHE_DIR, numba.config.THREADING_LAYER)
"""


def test_the_kernel_cache_follows_every_source_file(tmp_path):
    """Numba checks a cached kernel against its own file only; a kernel inlining a helper
    from another file must not outlive a change to that file, so the cache folder is named
    after every file holding compiled code: a change to any one (a callee's) names another
    folder; a change elsewhere (the engine) keeps it."""
    from refsim.jit import _COMPILED_SOURCES, sources_digest

    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "matmul.py").write_text("from .requant import requant_one\n")
    (tmp_path / "kernels" / "requant.py").write_text("def requant_one(x): return x >> 1\n")
    (tmp_path / "engine.py").write_text("steps = []\n")
    before = sources_digest(tmp_path, _COMPILED_SOURCES)
    assert sources_digest(tmp_path, _COMPILED_SOURCES) == before  # stable
    (tmp_path / "engine.py").write_text("steps = [1]\n")  # no compiled code: the cache stays
    assert sources_digest(tmp_path, _COMPILED_SOURCES) == before
    (tmp_path / "kernels" / "requant.py").write_text("def requant_one(x): return x >> 2\n")
    assert sources_digest(tmp_path, _COMPILED_SOURCES) != before


def test_compiled_kernels_go_to_the_user_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["REFSIM_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", CACHE_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    cache, layer = result.stdout.split()
    from refsim.jit import source_fingerprint

    assert Path(cache) == tmp_path / "numba" / source_fingerprint() and layer == "default"  # Numba's own order
    assert list((tmp_path / "numba").rglob("*.nbi")), "no Numba index file in the user cache"


def test_ray_runs_batches_on_a_local_cluster():
    pytest.importorskip("ray")
    model = load(MODEL)
    samples = _samples(12, seed=4)
    _same(run_samples(model, samples, batch_size=4, ray="local"), _one_at_a_time(model, samples))
