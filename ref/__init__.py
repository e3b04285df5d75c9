"""refsim: a bit-exact integer reference simulator for quantized transformers."""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

from .errors import RefsimError

# The rest is imported on first use, so that `import refsim.cli` is light: the command line
# starts handling Ctrl-C (exit 130, one line) before NumPy and Numba load. Submodules
# (refsim.intq, refsim.dtypes, ...) load on first access as well.
_LAZY = {"GraphBuilder": ".builder", "Model": ".engine", "load": ".engine"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'refsim' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + ["ops"])


__all__ = ["GraphBuilder", "Model", "RefsimError", "load", "ops", "__version__"]
