"""refsim: a bit-exact integer reference simulator for quantized transformers."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .errors import RefsimError

# The rest is imported on first use, so that `import refsim.cli` is light: the command line
# starts handling Ctrl-C (exit 130, one line) before NumPy and Numba load.
_LAZY = {"GraphBuilder": ".builder", "Model": ".engine", "load": ".engine", "ops": None}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'refsim' has no attribute {name!r}")
    module = _LAZY[name]
    value = importlib.import_module(f"{__name__}.{name}") if module is None else getattr(
        importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["GraphBuilder", "Model", "RefsimError", "load", "ops", "__version__"]
