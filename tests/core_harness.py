"""Running one core-op `Case` through refsim two ways and comparing with torch_core.

Direct: `refsim.ops.<Op>(*arrays, **attrs)`, where the arrays' NumPy dtypes are the types.
In a graph: a one-node graph built with GraphBuilder, the inputs declared with the case's
IR types (graph inputs or constants, so prepared kernels run too), run by the engine.
In both, a result must equal the torch reference exactly (values, IR type, shape); where
the reference says the formula is undefined, refsim must raise a RefsimError.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch_core
from refsim import GraphBuilder, RefsimError
from refsim.ops import OPS
from torch_core import STORAGE, Undefined

TAKES_IN_GRAPH = {"Lut"}


def reference(case, in_graph: bool):
    types = case.types if in_graph else [None if a is None else torch_core.storage_type_name(a) for a in case.inputs]
    extra = {"in_graph": in_graph} if case.op in TAKES_IN_GRAPH else {}
    try:
        return torch_core.REFERENCES[case.op](*case.inputs, types=types, **case.attrs, **extra)
    except Undefined as e:
        return e


def run_direct(case):
    return OPS[case.op].fn(*case.inputs, **case.attrs)


def build_graph(case):
    b = GraphBuilder(f"one_{case.op}")
    names, feeds = [], {}
    for i, (array, t, const) in enumerate(zip(case.inputs, case.types, case.const)):
        if array is None:
            names.append(None)
        elif const:
            names.append(b.const(array, t, name=f"c{i}"))
        else:
            names.append(b.input(f"in{i}", t, np.shape(array)))
            feeds[f"in{i}"] = array
    y = b.node(case.op, names, **case.attrs)
    b.output(y)
    return b.model(), feeds, y


def run_graph(case):
    model, feeds, y = build_graph(case)
    return model.run(feeds)[y], model.graph.tensors[y]


def _same(got: np.ndarray, expected, what: str):
    got = np.asarray(got)
    assert got.dtype == np.dtype(STORAGE[expected.dtype]), f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    assert got.shape == expected.values.shape, f"{what}: shape {got.shape}, expected {expected.values.shape}"
    mismatch = got.astype(np.int64) != expected.values
    if mismatch.any():
        where = np.argwhere(mismatch)[:5].tolist()
        pytest.fail(f"{what}: values differ at {where}: got {got[mismatch][:5].tolist()}, expected {expected.values[mismatch][:5].tolist()}")


def check_direct(case):
    expected = reference(case, in_graph=False)
    if isinstance(expected, Undefined):
        with pytest.raises(RefsimError):
            run_direct(case)
        return
    _same(run_direct(case), expected, f"{case.op} called directly")


def check_graph(case):
    expected = reference(case, in_graph=True)
    if isinstance(expected, Undefined):
        with pytest.raises(RefsimError):
            run_graph(case)
        return
    got, declared = run_graph(case)
    _same(got, expected, f"{case.op} in a graph")
    # the op's inference declared exactly this type and a shape the result has
    assert declared.dtype.name == expected.dtype, f"inferred type {declared.dtype.name}, op computes {expected.dtype}"
    assert len(declared.shape) == got.ndim
    assert all(d == g for d, g in zip(declared.shape, got.shape) if isinstance(d, int))


def check_case(case):
    check_direct(case)
    check_graph(case)
