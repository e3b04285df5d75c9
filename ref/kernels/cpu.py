"""What this CPU can run: feature detection and the Linux AMX permission request.

AMX tile instructions fault unless the process has asked the kernel for the tile data
state (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16+), so `amx_usable()` checks the CPU's
features AND gets that permission before anything may execute an AMX instruction.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

_ARCH_PRCTL = 158  # x86_64 syscall number
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


@functools.lru_cache(maxsize=None)
def host_features() -> frozenset[str]:
    """LLVM's names for the features of the CPU Numba compiles for."""
    try:
        import llvmlite.binding as llvm

        return frozenset(name for name, on in llvm.get_host_cpu_features().items() if on)
    except Exception:
        return frozenset()


def _request_tile_permission() -> bool:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
            return False
        granted = ctypes.c_uint64(0)
        if libc.syscall(_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(granted)) != 0:
            return False
        return bool(granted.value & (1 << _XFEATURE_XTILEDATA))
    except (OSError, AttributeError):
        return False


@functools.lru_cache(maxsize=None)
def _amx_available() -> bool:
    return {"amx-int8", "amx-tile"} <= host_features() and _request_tile_permission()


GEMM_CHOICES = ("auto", "amx", "vnni", "avx2", "blas")


def gemm_choice() -> str:
    """REFSIM_GEMM (read when a model is loaded): auto (default), amx, vnni, avx2, or blas
    (no integer GEMM: float BLAS in exact chunks), to compare kernels."""
    choice = os.environ.get("REFSIM_GEMM", "auto")
    return choice if choice in GEMM_CHOICES else "auto"


def amx_usable() -> bool:
    """AMX int8 is present, Numba targets it, the kernel lets us use it, and REFSIM_GEMM
    allows it."""
    return gemm_choice() in ("auto", "amx") and _amx_available()


def vnni_usable() -> bool:
    """AVX-512 VNNI (VPDPBUSD on zmm registers) is present and REFSIM_GEMM allows it."""
    return gemm_choice() in ("auto", "vnni") and {"avx512vnni", "avx512bw", "avx512f"} <= host_features()


def avx2_usable() -> bool:
    """AVX2 (VPMADDWD on ymm registers) is present and REFSIM_GEMM allows it: the exact
    integer GEMM of CPUs without AVX-512 VNNI."""
    return gemm_choice() in ("auto", "avx2") and "avx2" in host_features()
