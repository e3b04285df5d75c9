"""Running a model with the engine's trace hook and keeping what it produced.

The engine calls `trace(node, name, array)` for every tensor a node produces; a capture
keeps the arrays whose names are wanted (all by default), together with the graph inputs
it was fed, in execution order. The arrays are the engine's own results, kept by reference:
ops return fresh arrays and never write into their inputs, so nothing needs copying.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from ..engine import Model
from ..errors import InputError
from ..inputs import Sample
from ..ir import Node


@dataclass
class CapturedSample:
    """Every wanted tensor of one run: graph inputs first, then in execution order."""

    index: int
    source: str
    text: str | None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    producers: dict[str, Node] = field(default_factory=dict)  # absent for graph inputs


def tensor_filter(patterns: str | Iterable[str] | None) -> Callable[[str], bool]:
    """A predicate for `--tensors`: comma-separated shell-style globs, None for all."""
    if patterns is None:
        return lambda name: True
    if isinstance(patterns, str):
        patterns = [p for p in (s.strip() for s in patterns.split(",")) if p]
    patterns = list(patterns)
    if not patterns:
        raise InputError("--tensors needs at least one pattern")
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def capture(model: Model, sample: Sample, index: int = 0, wanted: Callable[[str], bool] | None = None) -> CapturedSample:
    """Run `model` on one sample and keep every wanted tensor (inputs included)."""
    wanted = wanted or (lambda name: True)
    result = CapturedSample(index, sample.source, sample.text)

    def trace(node: Node, name: str, array: np.ndarray) -> None:
        if wanted(name):
            result.arrays[name] = array
            result.producers[name] = node

    model.run(sample.feeds, trace=trace)
    # The run has checked the feeds; store them as the declared storage type, first.
    inputs = {}
    for t in model.inputs:
        if wanted(t.name):
            inputs[t.name] = np.ascontiguousarray(np.asarray(sample.feeds[t.name]).astype(t.dtype.storage, copy=False))
    result.arrays = {**inputs, **result.arrays}
    return result
