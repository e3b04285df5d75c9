"""Target layouts for golden vectors: one module per target, registered here by name.

A target module defines

    write(ctx)            lay out one sample (a `refsim.golden.vectorset.SampleContext`)
    describe(options)     optional: a JSON-able description for the manifest
    check(graph, options) optional: refuse, before anything runs, a model it cannot serve
    NEEDS_ALL_TENSORS     optional: True if it needs tensors beyond those --tensors selects

and is looked up with `target(name)`. Adding a target means adding a module and a line in
`TARGETS`; nothing else changes.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from refsim.errors import InputError

TARGETS = {
    "npy": "refsim.hw_vectors.npy",
    "memh": "refsim.hw_vectors.memh",
    "c": "refsim.hw_vectors.c",
    "ita": "refsim.hw_vectors.ita",
}


def target(name: str) -> ModuleType:
    try:
        return importlib.import_module(TARGETS[name])
    except KeyError:
        raise InputError(f"unknown target {name!r}; targets: {', '.join(TARGETS)}") from None


def targets(names: str | list[str]) -> dict[str, ModuleType]:
    """Modules for a comma-separated list of target names, `npy` always first."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    ordered = ["npy"] + [n for n in dict.fromkeys(names) if n != "npy"]
    return {n: target(n) for n in ordered}
