"""The op table: every IR op is one pure function registered here with its schema.

An op is declared once, next to its implementation:

    @op("Relu", inputs=["x"], infer=same_as_input)
    def Relu(x): ...

Positional parameters are the op's inputs (a trailing `?` in `inputs` marks an optional one,
a leading `*` a variadic list); keyword-only parameters are its attributes, with their
defaults taken from the signature and their allowed values from `attrs=`. The engine looks
ops up by name and calls `fn(*inputs, **attrs)`; it special-cases none of them.

`infer(inputs, attrs)` receives the input tensors' declared types (`Tensor` objects, None
for an omitted optional input) and the node's full attributes, and returns `(IntType,
shape)` for each output. It must agree with what `fn` returns; tests check that it does.

An op may also give `prepare(attrs, consts, declared) -> callable | None`, returning a
kernel specialised for its constant inputs (`consts`: input position -> array; `declared`:
each input's declared `Tensor`, None where omitted), for example weights converted once for BLAS. The kernel
takes the same inputs as `fn` and must compute exactly what `fn` computes; it only moves
work from every call to load time.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..dtypes import TYPES, IntType
from ..errors import GraphError, OpError, RefsimError

_REQUIRED = inspect.Parameter.empty


# --- attribute specifications --------------------------------------------------------


@dataclass(frozen=True)
class Int:
    """An integer attribute, optionally bounded; `optional` allows None."""

    min: int | None = None
    max: int | None = None
    optional: bool = False

    def check(self, value) -> str | None:
        if value is None and self.optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {value!r}"
        if self.min is not None and value < self.min:
            return f"must be >= {self.min}, got {value}"
        if self.max is not None and value > self.max:
            return f"must be <= {self.max}, got {value}"
        return None


@dataclass(frozen=True)
class Ints:
    """A list of integers, optionally each bounded."""

    min: int | None = None
    max: int | None = None
    optional: bool = False

    def check(self, value) -> str | None:
        if value is None and self.optional:
            return None
        if not isinstance(value, (list, tuple)):
            return f"must be a list of integers, got {value!r}"
        for v in value:
            problem = Int(self.min, self.max).check(v)
            if problem:
                return f"element {problem}"
        return None


@dataclass(frozen=True)
class Bool:
    def check(self, value) -> str | None:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


@dataclass(frozen=True)
class OneOf:
    choices: tuple
    optional: bool = False

    def check(self, value) -> str | None:
        if value is None and self.optional:
            return None
        if isinstance(value, (list, dict)) or value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}; got {value!r}"
        return None


@dataclass(frozen=True)
class TypeName:
    """The name of an IR integer type."""

    optional: bool = False

    def check(self, value) -> str | None:
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or value not in TYPES:
            return f"must be an integer type ({', '.join(TYPES)}); got {value!r}"
        return None


OVERFLOW_POLICIES = ("error", "wrap", "saturate")


# --- the schema ----------------------------------------------------------------------


@dataclass
class OpSchema:
    name: str
    fn: Callable
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attr_specs: dict[str, Any]
    defaults: dict[str, Any]
    infer: Callable
    prepare: Callable | None
    doc: str

    @property
    def variadic(self) -> bool:
        return any(name.startswith("*") for name in self.inputs)

    @property
    def min_inputs(self) -> int:
        return sum(1 for n in self.inputs if not n.endswith("?") and not n.startswith("*"))

    def full_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return {**self.defaults, **attrs}

    def check_arity(self, node) -> None:
        count = len(node.inputs)
        if count < self.min_inputs or (not self.variadic and count > len(self.inputs)):
            expected = ", ".join(self.inputs)
            raise GraphError(f"{node.describe()}: takes inputs ({expected}), got {count}")
        for position, name in enumerate(self.inputs):
            required = not name.endswith("?") and not name.startswith("*")
            if required and position < count and not node.inputs[position]:
                raise GraphError(f"{node.describe()}: required input {name!r} is empty")
        if len(node.outputs) != len(self.outputs):
            raise GraphError(
                f"{node.describe()}: produces {len(self.outputs)} output(s), "
                f"{len(node.outputs)} declared"
            )

    def check_attrs(self, node) -> None:
        for key, value in node.attrs.items():
            if key not in self.attr_specs:
                known = ", ".join(self.attr_specs) or "none"
                raise GraphError(
                    f"{node.describe()}: unknown attribute {key!r} (attributes: {known})"
                )
            problem = self.attr_specs[key].check(value)
            if problem:
                raise GraphError(f"{node.describe()}: attribute {key!r} {problem}")
        missing = [k for k, v in self.defaults.items() if v is _REQUIRED and k not in node.attrs]
        if missing:
            raise GraphError(f"{node.describe()}: missing required attribute(s) {missing}")

    def infer_node(self, node, tensors) -> list[tuple[IntType, tuple]]:
        ins = [tensors[n] if n else None for n in node.inputs]
        try:
            return self.infer(ins, self.full_attrs(node.attrs))
        except RefsimError as e:  # an op's infer may reuse checks that raise OpError
            raise GraphError(f"{node.describe()}: {e}") from None

    def check_types(self, node, tensors) -> None:
        """Compare each declared output type and shape with what the op produces."""
        for name, (dtype, shape) in zip(node.outputs, self.infer_node(node, tensors)):
            declared = tensors[name]
            if declared.dtype is not dtype:
                raise GraphError(
                    f"{node.describe()}: output {name!r} is declared {declared.dtype.name} "
                    f"but the op produces {dtype.name}"
                )
            if not shapes_compatible(declared.shape, shape):
                raise GraphError(
                    f"{node.describe()}: output {name!r} is declared with shape "
                    f"{list(declared.shape)} but the op produces {list(shape)}"
                )


def shapes_compatible(a: Sequence, b: Sequence) -> bool:
    """Whether two shapes can describe the same tensor (symbols resolve at run time)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, int) and isinstance(y, int) and x != y:
            return False
    return True


OPS: dict[str, OpSchema] = {}


def op(
    name: str,
    *,
    inputs: Sequence[str],
    infer: Callable,
    outputs: Sequence[str] = ("y",),
    attrs: dict[str, Any] | None = None,
    prepare: Callable | None = None,
):
    """Register `fn` as IR op `name` (see the module docstring)."""
    attrs = dict(attrs or {})

    def register(fn: Callable) -> Callable:
        if name in OPS:
            raise RuntimeError(f"op {name!r} registered twice")
        params = inspect.signature(fn).parameters
        defaults = {
            p.name: p.default for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        if set(defaults) != set(attrs):
            raise RuntimeError(
                f"op {name}: keyword-only parameters {sorted(defaults)} must match the "
                f"attribute specs {sorted(attrs)}"
            )
        OPS[name] = OpSchema(
            name=name,
            fn=fn,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            attr_specs=attrs,
            defaults=defaults,
            infer=infer,
            prepare=prepare,
            doc=(inspect.getdoc(fn) or "").split("\n")[0],
        )
        return fn

    return register


# --- calling ops directly on arrays ----------------------------------------------------

_NARROW = {"i": (np.int8, np.int16, np.int32), "u": (np.uint8, np.uint16, np.uint32)}


def narrowest(value):
    """An integer array as the narrowest NumPy type of its signedness that holds its values
    (int64 [3, -4] -> int8); anything else unchanged."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return value
    array = np.asarray(value)
    if array.dtype.kind not in _NARROW:
        return value
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for candidate in _NARROW[array.dtype.kind]:
        info = np.iinfo(candidate)
        if np.dtype(candidate).itemsize >= array.dtype.itemsize:
            break
        if info.min <= lo and hi <= info.max:
            return array.astype(candidate)
    return value


_PUBLIC: dict[str, Callable] = {}


def public(name: str) -> Callable:
    """`refsim.ops.<name>`: the op function for arrays a Python user holds.

    An op bounds its work by its inputs' types, as a graph declares them. NumPy arrays come
    as int64 by default, so an op that refuses an array for its type (an int64 where at
    most 32 bits fit, or an int64 product bound that could overflow) is tried once more
    with every integer input narrowed to the smallest type holding its values: an array is
    accepted when its values fit. Graphs keep the declared types (the engine calls
    `OPS[name].fn`).
    """
    if name not in _PUBLIC:
        fn = OPS[name].fn

        @functools.wraps(fn)
        def call(*inputs, **attrs):
            try:
                return fn(*inputs, **attrs)
            except OpError:
                narrowed = [narrowest(x) for x in inputs]
                if all(n is x for n, x in zip(narrowed, inputs)):
                    raise
            return fn(*narrowed, **attrs)

        _PUBLIC[name] = call
    return _PUBLIC[name]


def lookup(name: str, node=None) -> OpSchema:
    try:
        return OPS[name]
    except KeyError:
        where = f"{node.describe()}: " if node is not None else ""
        raise GraphError(
            f"{where}unknown op {name!r}; supported ops: {', '.join(sorted(OPS))}"
        ) from None


# --- inference helpers shared by many ops ---------------------------------------------


def same_as_input(ins, attrs):
    """The output has the first input's type and shape."""
    return [(ins[0].dtype, ins[0].shape)]


def broadcast_shapes(*shapes) -> tuple:
    """NumPy broadcasting over shapes that may hold symbols or None."""
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    out = []
    for dims in zip(*padded):
        concrete = {d for d in dims if isinstance(d, int) and d != 1}
        symbols = {d for d in dims if not isinstance(d, int)}
        if len(concrete) > 1:
            raise GraphError(f"shapes {[list(s) for s in shapes]} do not broadcast")
        if concrete:
            out.append(concrete.pop())
        elif len(symbols) == 1:
            out.append(symbols.pop())
        elif symbols:
            out.append(None)
        else:
            out.append(1)
    return tuple(out)
