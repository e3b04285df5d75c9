"""Which implementation runs the hot kernels: Numba (default) or plain NumPy.

Both give identical results; the NumPy path exists so every Numba kernel can be checked
against a second, simpler implementation, and for machines where Numba is unavailable.
Select with the REFSIM_BACKEND environment variable or `with refsim.backend.use("numpy")`.
"""

from __future__ import annotations

import contextlib
import os

BACKENDS = ("numba", "numpy")

_current = os.environ.get("REFSIM_BACKEND", "numba")
if _current not in BACKENDS:
    _current = "numba"

try:  # Numba is a declared dependency; fall back quietly only if it cannot load at all.
    import numba  # noqa: F401

    HAVE_NUMBA = True
except Exception:  # pragma: no cover - exercised only on broken installs
    HAVE_NUMBA = False
    _current = "numpy"


def current() -> str:
    return _current


def use_numba() -> bool:
    return _current == "numba"


@contextlib.contextmanager
def use(name: str):
    """Run the enclosed code with backend `name` ('numba' or 'numpy')."""
    global _current
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    if name == "numba" and not HAVE_NUMBA:
        raise RuntimeError("numba is not available")
    previous, _current = _current, name
    try:
        yield
    finally:
        _current = previous
