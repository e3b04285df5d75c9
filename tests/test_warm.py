"""The cold start (refsim.warm): a run whose kernels are not compiled yet computes the same
integers on the spec backend while a background job compiles them, then switches; the
guard that stops a run before anything compiles; the job lock; `refsim warmup`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from refsim import backend, jit, load, warm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL = EXAMPLES / "tiny_mlp.intq"


def _empty_cache_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(REFSIM_CACHE_DIR=str(cache), REFSIM_COMPILE="background")
    return env


def test_a_kernel_that_would_compile_raises_inside_no_compile():
    jit.materialize()

    @jit.njit(cache=False)
    def twice(x):
        return 2 * x

    with jit.no_compile(), pytest.raises(jit.NotCompiled, match="twice"):
        twice(3)
    assert twice(3) == 6  # compiled outside the guard
    with jit.no_compile():
        assert twice(4) == 8  # compiled now: the guard lets it run
        with pytest.raises(jit.NotCompiled):
            twice(np.arange(3))  # other types would compile


COLD_RUN = """
import json, sys, numpy as np, refsim
from refsim import warm
m = refsim.load({model!r})
x = np.random.default_rng(1).integers(-128, 128, (64, 16)).astype(np.int8)

def traced():
    seen = []
    out = m.run({{"x": x}}, trace=lambda node, name, array: seen.append((name, array.copy())))
    return out, seen

first, first_trace = traced()
assert "numba" not in sys.modules  # never compiled: loading and running needed no Numba
jobs = [p.name for p in warm.running_jobs()]
assert m._cold.ready is False and m._cold.job is not None
assert warm.wait(300), "the compile job did not finish"
done = json.loads(next(warm.jobs_dir().glob("*/done")).read_text())
second, second_trace = traced()  # the job is done: the kernels load from the cache
assert m._cold.ready is True
assert [n for n, _ in first_trace] == [n for n, _ in second_trace]
for (_, a), (_, b) in zip(first_trace, second_trace):
    assert a.dtype == b.dtype and np.array_equal(a, b)
np.savez(sys.argv[1], x=x, **{{"cold_" + k: v for k, v in first.items()}}, **{{"warm_" + k: v for k, v in second.items()}})
print(json.dumps({{"jobs": jobs, "job_cpu_s": done["cpu_s"]}}))
"""


def test_a_cold_run_computes_the_compiled_result_then_switches(tmp_path):
    """An empty kernel cache: the first run is the spec's (Numba not even loaded), a
    background job fills the cache, and the next run uses the kernels; both equal a run
    compiled in the foreground here, and each other tensor by tensor."""
    out = tmp_path / "out.npz"
    result = subprocess.run([sys.executable, "-c", COLD_RUN.format(model=str(MODEL)), str(out)], capture_output=True,
                            text=True, env=_empty_cache_env(tmp_path / "cache"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["jobs"]) == 1
    saved = np.load(out, allow_pickle=False)
    with backend.use("numba"):
        expected = load(MODEL).run({"x": saved["x"]})
    for name, array in expected.items():
        assert np.array_equal(saved["cold_" + name], array) and saved["cold_" + name].dtype == array.dtype
        assert np.array_equal(saved["warm_" + name], array)
    assert list((tmp_path / "cache" / "numba").rglob("*.nbi")), "the job wrote no kernels to the cache"


def test_the_spec_backend_never_loads_numba():
    code = ("import sys, numpy as np, refsim\nfrom refsim import backend\n"
            "with backend.use('spec'):\n    refsim.load(sys.argv[1]).run({'x': np.zeros((3, 16), np.int8)})\n"
            "print('numba' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(MODEL)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False"]


def test_one_job_per_lock_and_a_dead_jobs_lock_is_taken_over(tmp_path):
    (tmp_path / "job").mkdir()
    lock = tmp_path / "job" / "lock"
    assert warm._take(lock) and not warm._take(lock)  # held while its launcher writes the pid
    lock.write_text(str(os.getpid()))
    assert not warm._take(lock) and warm.running_jobs(tmp_path) == [tmp_path / "job"]
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(finished.stdout.strip())  # a job that died without removing its lock
    assert warm.running_jobs(tmp_path) == []
    assert warm._take(lock)


def test_declared_feeds_follow_the_declared_types_and_dims():
    model = load(MODEL)
    feeds = warm.declared_feeds(model, {"batch": 3})
    assert feeds["x"].shape == (3, 16) and feeds["x"].dtype == np.int8 and not feeds["x"].any()


def test_warmup_rejects_a_bad_dim(capsys):
    from refsim.cli import main

    assert main(["warmup", str(MODEL), "--dim", "batch"]) == 2
    assert "NAME=SIZE" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("REFSIM_SLOW") != "1", reason="about 40 s (the export): runs with REFSIM_SLOW=1; "
                    "in CI the op tests check every op on the spec's NumPy twins and its float products")
def test_a_transformer_on_the_spec_backend_equals_its_kernels_tensor_by_tensor(tmp_path):
    """A small BERT (I-BERT softmax, GELU and LayerNorm, weight and attention products): the
    spec backend a cold run uses gives every tensor the kernels give, fused steps included."""
    pytest.importorskip("transformers")
    import export_helpers as h
    from refsim.exporters import export
    from refsim.inputs import load_samples

    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(h.tokenizer_json())
    out = tmp_path / "bert.intq"
    export(h.bert(tmp_path / "bert.onnx", False), out, h.text_data(tmp_path / "calib.txt", 16, 1),
           tokenizer=str(tokenizer), max_length=h.SEQ, per_channel=True)
    model = load(out)
    samples = load_samples(model, h.text_data(tmp_path / "eval.txt", 4, 2))
    feeds = {k: np.concatenate([s.feeds[k] for s in samples]) for k in samples[0].feeds}

    def traced(name):
        seen = {}
        with backend.use(name):
            model.run(feeds, trace=lambda node, tensor, array: seen.__setitem__(tensor, array))
        return seen

    spec, kernels = traced("spec"), traced("numba")
    assert spec.keys() == kernels.keys() and len(spec) > 50
    ops = {node.op for node in model.graph.nodes}
    assert {"IBertSoftmax", "LutInterp16", "IBertLayerNorm", "MatMul"} <= ops, ops
    for name, array in kernels.items():
        assert spec[name].dtype == array.dtype and np.array_equal(spec[name], array), name
