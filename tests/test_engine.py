"""The engine and the builder: execution order and trace, requested outputs, freeing
intermediates, symbolic dimensions, and the builder's errors."""

import tracemalloc

import numpy as np
import pytest
import refsim
from refsim import GraphBuilder, RefsimError
from refsim.errors import GraphError
from refsim.ir import Graph, validate


def diamond(shuffle: bool):
    """x -> a -> (b, c) -> d, with the nodes listed out of order when `shuffle`."""
    b = GraphBuilder("diamond")
    x = b.input("x", "int8", ["batch", 4])
    a = b.node("Relu", [x], outputs="a", name="n_a")
    left = b.node("Add", [a, b.const(1, "int8", name="one")], outputs="b", name="n_b")
    right = b.node("Mul", [a, b.const(2, "int8", name="two")], outputs="c", name="n_c")
    d = b.node("Sub", [left, right], outputs="d", name="n_d")
    e = b.node("ReduceSum", [d], outputs="e", name="n_e", axes=[1], keepdims=False)
    b.output(e)
    graph = b.build()
    if shuffle:
        graph.nodes = graph.nodes[::-1]
    return refsim.Model(graph)


@pytest.mark.parametrize("shuffle", [False, True])
def test_trace_sees_every_tensor_once_in_execution_order(each_backend, shuffle):
    model = diamond(shuffle)
    seen = []
    x = np.array([[-3, 0, 5, 127], [1, 2, 3, 4]], np.int8)
    out = model.run({"x": x}, trace=lambda node, name, array: seen.append((node.name, name, array.copy())))
    names = [name for _, name, _ in seen]
    assert sorted(names) == ["a", "b", "c", "d", "e"], "every produced tensor exactly once"
    assert names == [o for node in model.order for o in node.outputs], "in execution order"
    position = {name: i for i, name in enumerate(names)}
    for node in model.graph.nodes:
        for i in node.inputs:
            if i in position:
                assert position[i] < position[node.outputs[0]], f"{i} traced after its consumer {node.name}"
    values = {name: array for _, name, array in seen}
    # worked out from the formulas: a = relu(x); b = a + 1; c = 2a; d = b - c = 1 - a; e = sum(d)
    a = np.maximum(x.astype(np.int64), 0)
    assert values["d"].tolist() == (1 - a).tolist()
    assert out["e"].tolist() == (1 - a).sum(axis=1).tolist() == values["e"].tolist()
    if not shuffle:  # a graph already in order runs in its own order
        assert [n for n, _, _ in seen] == ["n_a", "n_b", "n_c", "n_d", "n_e"]


def test_outputs_can_name_intermediates_inputs_and_constants(each_backend):
    model = diamond(False)
    x = np.array([[1, 2, 3, 4]], np.int8)
    got = model.run({"x": x}, outputs=["c", "a", "x", "two"])
    assert list(got) == ["c", "a", "x", "two"]
    assert got["c"].tolist() == [[2, 4, 6, 8]] and got["a"].tolist() == [[1, 2, 3, 4]]
    assert got["x"].tolist() == x.tolist() and got["two"].tolist() == 2
    with pytest.raises(RefsimError, match="no tensor named 'zz'"):
        model.run({"x": x}, outputs=["zz"])


def test_symbolic_dimensions_bind_per_run():
    model = diamond(False)
    for batch in (1, 3, 0):
        out = model.run({"x": np.ones((batch, 4), np.int8)})
        assert out["e"].shape == (batch,)
    with pytest.raises(RefsimError, match="dimension 1 is 5 instead of 4"):
        model.run({"x": np.ones((2, 5), np.int8)})


def test_intermediates_are_freed_after_their_last_use():
    """A chain of 24 ops on a 2 MB tensor, each with a dead int32 side output: peak memory
    stays at a few working copies (8 here), not the ~77 it takes when nothing is freed."""
    b = GraphBuilder("chain")
    v = b.input("x", "int16", [1024, 1024])
    for i in range(24):
        v = b.node("Relu", [v], name=f"r{i}")
        b.node("Cast", [v], name=f"dead{i}", dtype="int32")  # produced, never read
    b.output(v)
    model = b.model()
    x = np.ones((1024, 1024), np.int16)
    tracemalloc.start()
    try:
        model.run({"x": x})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one = x.nbytes
    assert peak < 20 * one, f"peak {peak / one:.1f} tensors: intermediates are kept alive"


def test_trace_can_keep_what_it_sees():
    model = diamond(False)
    kept = {}
    model.run({"x": np.ones((1, 4), np.int8)}, trace=lambda node, name, a: kept.setdefault(name, a))
    assert kept["a"].tolist() == [[1, 1, 1, 1]]  # still intact after the run freed its copy


def test_a_large_graph_listed_backwards_is_ordered():
    b = GraphBuilder("long")
    v = b.input("x", "int8", [2])
    for i in range(3000):
        v = b.node("Relu", [v], name=f"r{i}")
    b.output(v)
    graph = b.build()
    graph.nodes.reverse()
    order = validate(graph)
    assert [n.name for n in order] == [f"r{i}" for i in range(3000)]


def test_builder_errors_are_clear():
    b = GraphBuilder("bad")
    x = b.input("x", "int8", [2, 3])
    with pytest.raises(GraphError, match="unknown op 'Softplus9'"):
        b.node("Softplus9", [x])
    with pytest.raises(GraphError, match="input 'nope' is not declared"):
        b.node("Relu", ["nope"])
    with pytest.raises(GraphError, match="declared twice"):
        b.input("x", "int8", [1])
    assert b.inputs == ["x"], "a rejected input is not half-added"
    with pytest.raises(GraphError, match="unknown attribute 'gain'"):
        b.node("Relu", [x], gain=2)
    with pytest.raises(GraphError, match="attribute 'acc_bits' must be <= 64"):
        b.node("MatMul", [x, b.const(np.zeros((3, 1)), "int8")], acc_bits=65)
    with pytest.raises(GraphError, match="takes inputs"):
        b.node("Relu", [x, x])
    with pytest.raises(GraphError, match=r"node 'mm' \(MatMul\): inner dimensions differ"):
        b.node("MatMul", [x, b.const(np.zeros((4, 1)), "int8")], name="mm")
    y = b.node("Relu", [x], outputs="y", name="r")
    with pytest.raises(GraphError, match="already declared"):
        b.node("Relu", [x], outputs="y")
    with pytest.raises(GraphError, match="two nodes are named 'r'"):
        b.node("Relu", [x], name="r", outputs="y2")
    assert "y2" not in b.tensors, "a rejected node declares nothing"
    with pytest.raises(RefsimError, match="outside int4"):
        b.const([9], "int4")
    with pytest.raises(RefsimError, match="not integers"):
        b.const([1.5], "int8")
    with pytest.raises(RefsimError, match="unknown integer type 'int7'"):
        b.input("z", "int7", [1])
    b.output(y, "ghost")
    with pytest.raises(GraphError, match="'ghost' has no tensor entry"):
        b.build()


def test_graph_validation_catches_structural_mistakes():
    model = diamond(False)
    g = model.graph
    broken = Graph(g.name, g.inputs, g.outputs, dict(g.tensors), list(g.nodes))
    broken.nodes[0].inputs = ["d"]  # a -> ... -> d -> a
    with pytest.raises(GraphError, match="cycle"):
        validate(broken)


def test_none_attributes_mean_omitted_and_round_trip(tmp_path):
    b = GraphBuilder("none")
    x = b.input("x", "int32", [2])
    y = b.node("Requant", [x, b.const(1, "int32"), b.const(0, "int8")], dtype="int8", lo=None, hi=None)
    b.output(y)
    path = tmp_path / "n.intq"
    b.model().save(path)
    model = refsim.load(path)
    assert model.graph.nodes[0].attrs == {"dtype": "int8"}
    assert model.run({"x": np.array([300, -5], np.int32)})[y].tolist() == [127, -5]


def test_constants_and_feeds_of_the_wrong_kind_are_refused():
    b = GraphBuilder("k")
    with pytest.raises(RefsimError, match="not integers"):
        b.const(["a", "b"], "int8")
    with pytest.raises(RefsimError, match="within int64"):
        b.const([1 << 70], "int64")
    with pytest.raises(RefsimError, match="not integers"):
        b.const([float("nan")], "int32")
    assert b.const([2.0, -3.0], "int8")  # integral floats are fine
    with pytest.raises(RefsimError, match="feeds must map"):
        diamond(False).run([np.zeros((1, 4), np.int8)])
