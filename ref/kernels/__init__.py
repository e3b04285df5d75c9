"""Fast kernels for the ops (see `registry`), and the low-level pieces they use: CPU
detection, exact integer GEMMs (AMX, VNNI), planned requantization.

Importing this package registers every kernel; Numba compiles each only when a model
first runs it.
"""

from ..jit import materialize

materialize()  # Numba up, and the ops' jitted helpers real, before kernels import them

from . import elementwise, layernorm, lut, matmul, requant, softmax  # noqa: E402, F401  (registration)
from .registry import KERNELS, choose, kernel  # noqa: E402

__all__ = ["KERNELS", "choose", "kernel"]
