"""Fast kernels, registered apart from the ops' readable formulas and chosen at prepare time.

An op in `refsim.ops` is its formula in plain NumPy (docs/OPS.md). A kernel for it is

    @kernel("Requant")
    def planned_requant(attrs, consts, declared) -> callable | None: ...

given the node's full attributes, its constant inputs (position -> array) and every input's
declared `Tensor` (None where omitted). It returns a callable that takes the op's inputs
and computes exactly what the op's function computes, or None when it does not apply
(the next registered kernel is asked, then the op's own `prepare`, then the formula
itself). The tests check every kernel against its op on the same cases.

A prepared kernel may also offer `fuse(consumer)`, returning one callable that does its
work and then the consumer's (the next node's prepared kernel, whose other inputs are all
constants) in one pass; see `refsim.engine`.
"""

from __future__ import annotations

from typing import Callable

KERNELS: dict[str, list[Callable]] = {}


def kernel(op_name: str):
    """Register a kernel preparer for `op_name` (tried in registration order)."""

    def register(prepare: Callable) -> Callable:
        KERNELS.setdefault(op_name, []).append(prepare)
        return prepare

    return register


def choose(op_name: str, attrs, consts, declared) -> Callable | None:
    """The first registered kernel that applies to this node, or None."""
    for prepare in KERNELS.get(op_name, ()):
        chosen = prepare(attrs, consts, declared)
        if chosen is not None:
            return chosen
    return None
