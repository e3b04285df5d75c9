"""Every IR op as a plain function: `refsim.ops.<OpName>(*inputs, **attrs) -> ndarray`.

Op modules in this package register themselves on import (see `registry`); this package
imports all of them, so adding an op means adding a module and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from .registry import OPS, OpSchema, lookup, public

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def __getattr__(name: str):
    if name in OPS:
        return public(name)  # the op function, accepting int64 arrays whose values fit
    raise AttributeError(f"module 'refsim.ops' has no op {name!r}")


def __dir__():
    return sorted(list(globals()) + list(OPS))


__all__ = ["OPS", "OpSchema", "lookup", *sorted(OPS)]
