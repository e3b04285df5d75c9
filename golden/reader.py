"""Reading a vector set back, for testbenches: `refsim.golden.open(folder)`.

    import refsim.golden

    vs = refsim.golden.open("vectors")
    for sample in vs.samples:                      # one mapping per sample: tensor -> array
        x = sample["fc1.acc"]                      # np.ndarray, storage dtype, loaded on use
    for node in vs.nodes("Requant"):               # every Requant node that produced a tensor
        mul, shift = node.const("mul"), node.const("shift")   # by input role, or by tensor name
        node.attrs["rounding"], node.output, node.input_names
        for sample in vs.samples:
            acc, out = sample[node.inputs[0].name], sample[node.output]

Everything comes from the manifest (docs/GOLDEN.md): each tensor's type and shape, the
node that produced it with its attributes and inputs, and the constant inputs, stored once
under `constants/`. No `.intq` is needed. The memh readers for a hardware dump are
`refsim.golden.memh.read_values(path, dtype, count, word_bits)` and `parse_words`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .vectorset import VectorSetError, load_manifest

# The positional input names of the ops testbenches most often drive (docs/OPS.md), so that
# node.const("mul") works without knowing the tensor's name.
INPUT_ROLES = {
    "Requant": ("x", "mul", "shift", "bias", "offset"),
    "RequantShift": ("x", "mul", "add"),
    "RequantF32": ("x", "mul", "exp", "offset"),
    "MatMul": ("a", "b", "a_zero_point", "b_zero_point", "bias"),
    "Conv": ("x", "w", "x_zero_point", "w_zero_point", "bias"),
}


def _load(root: Path, relpath: str) -> np.ndarray:
    try:
        return np.load(root / relpath, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise VectorSetError(f"{root / relpath}: cannot read: {e}") from None


@dataclass(frozen=True)
class InputInfo:
    """One input of a node: a tensor of the run, a constant, or omitted (name None)."""

    name: str | None
    dtype: str | None = None
    shape: list | None = None
    const: bool = False
    file: str | None = None
    value: Any = None  # small constants, inline in the manifest


@dataclass
class NodeInfo:
    """The node that produced a tensor of the set: op, attributes, inputs, constants."""

    name: str
    op: str
    attrs: dict[str, Any]
    inputs: list[InputInfo]
    outputs: list[str]
    _root: Path = field(repr=False, default=Path("."))
    _cache: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    @property
    def output(self) -> str:
        return self.outputs[0]

    @property
    def input_names(self) -> list[str | None]:
        return [i.name for i in self.inputs]

    def _input(self, key: str | int) -> InputInfo:
        if isinstance(key, int):
            return self.inputs[key]
        roles = INPUT_ROLES.get(self.op, ())
        if key in roles and roles.index(key) < len(self.inputs):
            return self.inputs[roles.index(key)]
        for i in self.inputs:
            if i.name == key:
                return i
        raise KeyError(f"{self.name} ({self.op}) has no input {key!r}; its inputs are {self.input_names}")

    def has(self, key: str | int) -> bool:
        try:
            return self._input(key).name is not None
        except (KeyError, IndexError):
            return False

    def const(self, key: str | int) -> np.ndarray | None:
        """A constant input by role ("mul", "shift", ...), tensor name or position; None if omitted."""
        i = self._input(key)
        if i.name is None:
            return None
        if not i.const:
            raise VectorSetError(f"{self.name} ({self.op}): input {i.name!r} is computed, not a constant; read it from a sample")
        if i.name not in self._cache:
            self._cache[i.name] = _load(self._root, i.file)
        return self._cache[i.name]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    kind: str  # input / intermediate / output
    dtype: str
    bits: int
    signed: bool
    declared_shape: list
    node: NodeInfo | None
    scale: Any = None
    zero_point: Any = None


class SampleView(Mapping):
    """One sample of the set: tensor name -> array (loaded from its .npy when first asked)."""

    def __init__(self, vs: "VectorSet", index: int, entry: dict[str, Any]):
        self._vs, self.index, self.entry = vs, index, entry
        self.source = entry.get("source")
        self.text = entry.get("text")
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            path = self._vs._npy.get((name, self.index))
            if path is None:
                raise KeyError(f"tensor {name!r} is not in sample {self.index} of {self._vs.root}")
            self._arrays[name] = _load(self._vs.root, path)
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._vs.tensors if (name, self.index) in self._vs._npy)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class VectorSet:
    """A vector set written by `refsim golden`, read through its manifest."""

    def __init__(self, folder: str | os.PathLike):
        self.root = Path(folder)
        self.manifest = load_manifest(self.root)
        self._npy = {
            (f["tensor"], f["sample"]): f["path"]
            for f in self.manifest["files"]
            if f.get("target") == "npy" and "tensor" in f
        }
        self.tensors: dict[str, TensorInfo] = {}
        self._nodes: dict[str, NodeInfo] = {}
        for t in self.manifest["tensors"]:
            node = None
            if t.get("node") is not None and "inputs" in t:
                node = self._nodes.get(t["node"])
                if node is None:
                    inputs = [InputInfo(**{k: v for k, v in i.items() if k in InputInfo.__dataclass_fields__})
                              for i in t["inputs"]]
                    node = NodeInfo(t["node"], t["op"], dict(t.get("attrs", {})), inputs, list(t["outputs"]), self.root)
                    self._nodes[node.name] = node
            self.tensors[t["name"]] = TensorInfo(t["name"], t["file"], t["kind"], t["dtype"], t["bits"], t["signed"],
                                                 t["declared_shape"], node, t.get("scale"), t.get("zero_point"))
        self.samples = [SampleView(self, s["index"], s) for s in self.manifest["samples"]]

    def __repr__(self) -> str:
        return f"VectorSet({str(self.root)!r}: {len(self.samples)} sample(s), {len(self.tensors)} tensor(s))"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> SampleView:
        return self.samples[index]

    def nodes(self, op: str | None = None) -> Iterator[NodeInfo]:
        """The nodes that produced tensors of the set, in execution order (of one op, if given)."""
        return (n for n in self._nodes.values() if op is None or n.op == op)

    def node(self, name: str) -> NodeInfo:
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"{self.root}: no node {name!r} produced a tensor of the set") from None

    def array(self, tensor: str, sample: int = 0) -> np.ndarray:
        return self.samples[sample][tensor]


def open_set(folder: str | os.PathLike) -> VectorSet:
    """Open a vector set written by `refsim golden` (or `write_vector_set`)."""
    return VectorSet(folder)
