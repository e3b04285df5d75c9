"""Fast kernels for the ops (see `registry`), and the low-level pieces they use: CPU
detection, exact integer GEMMs (AMX, VNNI), planned requantization.

Importing this package registers every kernel; Numba compiles each only when a model
first runs it.
"""

from . import matmul, requant  # noqa: F401  (registration)
from .registry import KERNELS, choose, kernel

__all__ = ["KERNELS", "choose", "kernel"]
