"""Fast MatMul kernels, chosen when a model is prepared; each computes exactly what the
spec (`refsim.ops.matmul.MatMul`) computes.

- Constant weights: packed once for the exact u8 x s8 integer GEMM (AMX tiles where the CPU
  and OS allow, else AVX-512 VNNI, else AVX2's exact int16 VPMADDWD), when the declared
  activation type spans at most 256 values and every int32 sum provably fits; else float
  BLAS in exact chunks.
- Two computed operands (attention's Q.K^T and P.V): packed per call for the same VNNI
  GEMM when the declared types allow, else exact float32 BLAS.

The integer GEMM multiplies unsigned bytes by signed bytes, so activations a in [lo, hi]
enter as a - lo in [0, 255], and the product is corrected by a constant per column:

    (a - zp) @ b + bias = (a - lo) @ b + ((lo - zp) * colsum(b) + bias)

A weight product's output may be requantized in the same pass, while its int32 block is
still in cache (`fuse`); the engine asks for that when the next node is a Requant, or a Mul
by a constant (the residual branch's multiplier), which is the requantization with shift 0
and no clipping.
"""

from __future__ import annotations

import numpy as np

from .. import backend, jit
from ..errors import OpError
from ..ops import matmul as spec
from ..ops.matmul import FLOAT32_EXACT, FLOAT64_EXACT, INT64_LIMIT
from ..ops.rounding import FLOOR
from . import cpu
from .registry import kernel
from .requant import PLAN_ROWS

INT32_MAX = (1 << 31) - 1


def gemm_engine() -> str | None:
    """'amx', 'vnni', 'avx2' or None: the exact integer GEMM this machine runs
    (REFSIM_GEMM=blas turns all off, =vnni or =avx2 picks that one)."""
    if cpu.amx_usable():
        return "amx"
    if cpu.vnni_usable():
        return "vnni"
    if cpu.avx2_usable():
        return "avx2"
    return None


def _byte_gemm_module(engine: str | None):
    """The module whose gemm_weight / gemm_activations run on this engine (AMX machines
    have VNNI for the per-call products), or None."""
    if engine in ("amx", "vnni"):
        from . import vnni

        return vnni
    if engine == "avx2":
        from . import avx2

        return avx2
    return None


def int32_exact(k: int, lo: int, hi: int, zero_point: int, b_bound: int, bias_bound: int, acc_bits: int = 32) -> bool:
    """Whether the byte GEMM of (K-deep) activations in [lo, hi] against weights with
    |b| <= b_bound is exact in int32: every raw partial sum of (a - lo) * b, the
    correction, and the corrected result (which must also fit the acc_bits accumulator,
    so that no overflow policy ever applies)."""
    if hi - lo > 255:
        return False
    raw = k * (hi - lo) * b_bound
    exact = k * max(abs(lo - zero_point), abs(hi - zero_point)) * b_bound + bias_bound
    correction = abs(lo - zero_point) * k * b_bound + bias_bound
    acc_limit = (1 << (min(acc_bits, 32) - 1)) - 1
    return raw <= INT32_MAX and correction <= INT32_MAX and exact <= acc_limit


class PackedWeight:
    """A constant (K, N) weight (minus its zero point) in [-128, 127], packed for the
    integer GEMM of this machine."""

    def __init__(self, b: np.ndarray, engine: str):
        self.k, self.n = b.shape
        self.engine = engine
        # Python ints: np.abs of an int8 -128 is -128.
        self.bound = max(-int(b.min()), int(b.max()), 0) if b.size else 0
        self.colsum = b.sum(axis=0, dtype=np.int64)
        if engine == "amx":
            from . import amx

            self.packed = amx.pack_b(b.astype(np.int8))
        else:
            self.module = _byte_gemm_module(engine)
            self.packed = self.module.pack_b(b.astype(np.int8))
            self.kp = self.module.padded(self.k, self.module.KG)

    @classmethod
    def prepare(cls, b: np.ndarray) -> "PackedWeight | None":
        engine = gemm_engine()
        if engine is None or b.ndim != 2 or b.size == 0:
            return None
        if int(b.min()) < -128 or int(b.max()) > 127:
            return None
        return cls(b, engine)

    def correction(self, lo: int, zero_point: int, bias) -> np.ndarray:
        corr = (lo - zero_point) * self.colsum
        return corr if bias is None else corr + np.asarray(bias, np.int64)

    def product(self, a2: np.ndarray, lo: int, corr: np.ndarray, plan=None, out_range=(0, 0, 0), storage=np.int32,
                keep_acc: bool = False):
        """(a2 - lo) @ b + corr for a2 of shape (M, K): int32, or its requantization by
        `plan` into `storage` (then also the int32 sum when keep_acc)."""
        m = a2.shape[0]
        if self.engine == "amx":
            from . import amx
            from .requant import requant_rows

            shifted = _shift_to_bytes(a2, lo)
            acc = amx.gemm_u8s8(shifted, self.packed, self.k, self.n)
            acc = (acc + corr.astype(np.int32)) if np.any(corr) else np.ascontiguousarray(acc)
            if plan is None:
                return acc
            out = np.empty((m, self.n), storage)
            requant_rows(acc, plan, *out_range, out)
            return (acc, out) if keep_acc else out
        gemm = self.module

        if a2.dtype != np.int8:  # int8 as it is, anything else as bytes: two compiled variants
            a2, lo = _shift_to_bytes(a2, lo), 0
        a2 = np.ascontiguousarray(a2)
        none = np.empty((0, 0), np.int32)
        threads = jit.kernel_threads() if a2.size >= backend.MEASURE_MIN_ELEMENTS else 1  # the twin that will run
        if plan is None:
            out = np.empty((m, self.n), np.int32)
            gemm.gemm_weight(a2, lo, self.packed, self.kp, self.n, corr, _NO_PLAN, 0, 0, 0, 0, out, none, threads)
            return out
        out = np.empty((m, self.n), storage)
        acc = np.empty((m, self.n), np.int32) if keep_acc else none
        gemm.gemm_weight(a2, lo, self.packed, self.kp, self.n, corr, plan, *out_range, 1, out, acc, threads)
        return (acc, out) if keep_acc else out


_NO_PLAN = np.zeros((PLAN_ROWS, 1), np.int64)


def _shift_to_bytes(a2: np.ndarray, lo: int) -> np.ndarray:
    if lo == -128 and a2.dtype == np.int8:
        return a2.view(np.uint8) ^ np.uint8(0x80)
    if lo == 0 and a2.dtype == np.uint8:
        return a2
    return (a2.astype(np.int64) - lo).astype(np.uint8)  # the caller's bounds put it in [0, 255]


def _scalar(value) -> int:
    return 0 if value is None else int(np.asarray(value).reshape(-1)[0])


class MulAsRequant:
    """A Mul by a constant that is a scalar or runs along the last axis, posing as a
    prepared Requant (`plan_for`, `out_range`, `storage`) for a producer to fuse: x * c is
    requantize(x) with mul c, shift 0, no bias or offset and the output type's range, as
    long as the product needs no overflow policy (the Mul's own declared-type check)."""

    def __init__(self, constant: np.ndarray, out_type):
        self.constant = np.asarray(constant, np.int64).reshape(-1)
        self.out_range = (out_type.lo, out_type.hi, FLOOR)
        self.storage = out_type.storage
        self.plans: dict[int, np.ndarray] = {}

    @classmethod
    def of(cls, consumer, run_consumer) -> "MulAsRequant | None":
        from .elementwise import Arith

        if not isinstance(consumer, Arith) or consumer.op_name != "Mul":
            return None
        if not (consumer.within_int64 and consumer.fits_output):  # the values would decide
            return None
        constants = getattr(run_consumer, "args", (None, None))[1]  # the engine's partial(_call_with, kernel, constants)
        if not isinstance(constants, list) or len(constants) != 1 or constants[0] is None:
            return None
        c = np.asarray(constants[0])
        if c.ndim > 1 and c.size != 1 and c.shape[:-1] != (1,) * (c.ndim - 1):
            return None
        return cls(c, consumer.out_type)

    def plan_for(self, channels: int) -> np.ndarray | None:
        if self.constant.size not in (1, channels):
            return None
        if channels not in self.plans:
            from .requant import requant_plan

            self.plans[channels] = requant_plan(self.constant, 0, 0, 0, channels)
        return self.plans[channels]


def _as_requant(consumer, run_consumer):
    """`consumer` if it is a prepared Requant, a Mul by a constant posing as one, or None."""
    if hasattr(consumer, "plan_for"):
        return consumer
    return MulAsRequant.of(consumer, run_consumer)


class WeightMatMul:
    """MatMul against constant weights b (and a constant b_zero_point)."""

    def __init__(self, attrs, b_centered: np.ndarray, a_type, consts, computed_extras: bool):
        self.attrs = attrs
        self.b = b_centered
        self.b_bound = spec._bound(b_centered)
        self.a_type = a_type
        self.by_ftype = {}
        self.weight = PackedWeight.prepare(b_centered) if b_centered.ndim == 2 else None
        # With a constant (or no) zero point and bias the integer GEMM's bounds and
        # correction are settled now; computed ones are handled per call.
        self.computed_extras = computed_extras
        self.fixed = None
        if self.weight is not None and not computed_extras:
            try:
                self.fixed = self._correction_for(consts.get(2), consts.get(4))
            except OpError:
                pass  # the call reports it, naming the node

    def _correction_for(self, a_zero_point, bias):
        """The integer GEMM's per-column correction, or None when the bounds do not
        allow that GEMM."""
        bias_view = spec._bias_view(bias, self.b.shape[-1])
        bias_bound = spec._bound(bias_view) if bias_view is not None else 0
        zp = _scalar(a_zero_point)
        t = self.a_type
        if not int32_exact(self.weight.k, t.lo, t.hi, zp, self.weight.bound, bias_bound, self.attrs["acc_bits"]):
            return None
        return self.weight.correction(t.lo, zp, bias_view)

    def __call__(self, a, _b, a_zero_point=None, b_zero_point=None, bias=None):
        if not backend.use_numba():
            return spec.MatMul(a, _b, a_zero_point, b_zero_point, bias, **self.attrs)
        a = np.asarray(a)
        if self.attrs["transA"]:
            a = np.swapaxes(a, -1, -2)
        if a.ndim < 2 or a.shape[-1] != self.b.shape[-2]:
            raise OpError(f"MatMul: inner dimensions differ: {a.shape} @ {self.b.shape}")
        if a_zero_point is not None and np.asarray(a_zero_point).size != 1:
            raise OpError("MatMul: a_zero_point must be a scalar")
        corr = None
        if self.weight is not None:
            corr = self._correction_for(a_zero_point, bias) if self.computed_extras else self.fixed
        if corr is not None:
            flat = a.reshape(-1, self.weight.k)
            acc = self.weight.product(flat, self.a_type.lo, corr).reshape(a.shape[:-1] + (self.weight.n,))
            return acc if self.attrs["acc_bits"] <= 32 else acc.astype(np.int64)
        return self._blas(a, a_zero_point, bias)

    def _blas(self, a, a_zero_point, bias):
        """Float BLAS in chunks short enough that every partial sum is an exact integer."""
        acc_bits, overflow = self.attrs["acc_bits"], self.attrs["overflow"]
        bias_view = spec._bias_view(bias, self.b.shape[-1])
        bias_bound = spec._bound(bias_view) if bias_view is not None else 0
        a_centered = spec._minus_zero_point(a, a_zero_point, "a")
        k = a.shape[-1]
        # The declared type bounds a without a pass over it; the values decide when that
        # bound is too loose for the fast paths or for int64.
        a_bound = spec._declared_bound(self.a_type, a_zero_point)
        if a_bound * self.b_bound > FLOAT64_EXACT or k * a_bound * self.b_bound + bias_bound > INT64_LIMIT:
            a_bound = spec._bound(a_centered)
        spec.check_sum_fits(k, a_bound, self.b_bound, bias_bound)
        product = a_bound * self.b_bound
        ftype = np.float32 if product <= FLOAT32_EXACT else (np.float64 if product <= FLOAT64_EXACT else np.int64)
        if ftype not in self.by_ftype:
            self.by_ftype[ftype] = self.b.astype(ftype)
        acc = spec.exact_matmul(a_centered, self.by_ftype[ftype], a_bound, self.b_bound)
        return spec._finish(acc, bias_view, acc_bits, overflow)

    def fuse(self, consumer, run_consumer):
        """A kernel computing this product and then `consumer` (a prepared Requant) in
        one pass, or None; `consumer` may also be a Mul by a constant (`MulAsRequant`).
        It takes this node's inputs and returns (int32 product or None, requantized
        output); the product only when asked (`keep`)."""
        consumer = _as_requant(consumer, run_consumer) if backend.use_numba() else None
        if self.fixed is None or consumer is None:
            return None
        plan = consumer.plan_for(self.weight.n)
        if plan is None:
            return None
        weight, lo, corr, out_range, storage = self.weight, self.a_type.lo, self.fixed, consumer.out_range, consumer.storage
        trans_a = self.attrs["transA"]

        def fused(a, _b, *_rest, keep=False):
            a = np.asarray(a)
            if trans_a:
                a = np.swapaxes(a, -1, -2)
            if a.ndim < 2 or a.shape[-1] != weight.k:
                raise OpError(f"MatMul: inner dimensions differ: {a.shape} @ {(weight.k, weight.n)}")
            shape = a.shape[:-1] + (weight.n,)
            result = weight.product(a.reshape(-1, weight.k), lo, corr, plan, out_range, storage, keep_acc=keep)
            if keep:
                return result[0].reshape(shape), result[1].reshape(shape)
            return None, result.reshape(shape)

        return fused


@kernel("MatMul")
def weight_matmul(attrs, consts, declared):
    """Constant weights (and weight zero point): converted or packed once."""
    if 1 not in consts or (len(declared) > 3 and declared[3] is not None and 3 not in consts):
        return None
    b = np.asarray(consts[1])
    if b.ndim < 2:
        return None
    if attrs["transB"]:
        b = np.swapaxes(b, -1, -2)
    try:
        b_centered = spec._minus_zero_point(b, spec._b_zero_point_view(consts.get(3), b.shape[-1]), "b")
    except OpError:
        return None  # let the plain op report it at run time, naming the node
    computed_extras = any(len(declared) > i and declared[i] is not None and i not in consts for i in (2, 4))
    return WeightMatMul(attrs, b_centered, declared[0].dtype, consts, computed_extras)


class ActivationMatMul:
    """MatMul of two computed operands without zero points or bias (attention's Q.K^T and
    P.V): the declared types bound every product, so no pass over the values is needed."""

    def __init__(self, attrs, a_type, b_type):
        self.attrs = attrs
        self.a_type, self.b_type = a_type, b_type
        self.product_bound = max(-a_type.lo, a_type.hi) * max(-b_type.lo, b_type.hi)
        acc_bits = attrs["acc_bits"]
        self.acc_limit = (1 << (acc_bits - 1)) - 1
        self.out = np.int32 if acc_bits <= 32 else np.int64
        # The integer GEMM takes a with a - base in [A_LOW, A_SPAN]: VNNI's bytes [0, 256],
        # AVX2's words [-2^15, 2^15 - 1]. A type wider than bytes (I-BERT's softmax output,
        # 0..2^15, is stored as uint16) runs on AVX2's words, which every VNNI machine also
        # has, centred on the type's middle when it spans more than 2^15; a type wider
        # still is checked value by value in the kernel.
        engine = gemm_engine()
        self.gemm = _byte_gemm_module(engine)
        if self.gemm is not None and a_type.hi - a_type.lo > self.gemm.A_SPAN and engine != "avx2" and cpu.avx2_usable():
            self.gemm = _byte_gemm_module("avx2")
        self.bytes = self.gemm is not None and -128 <= b_type.lo and b_type.hi <= 127 and acc_bits <= 32
        low, span = (self.gemm.A_LOW, self.gemm.A_SPAN) if self.gemm is not None else (0, 256)
        self.a_base = a_type.lo if a_type.hi - a_type.lo <= span else a_type.lo - low
        self.a_hi = min(a_type.hi, self.a_base + span)

    def _operands(self, a, b):
        a, b = np.asarray(a), np.asarray(b)
        if self.attrs["transA"]:
            a = np.swapaxes(a, -1, -2)
        if self.attrs["transB"]:
            b = np.swapaxes(b, -1, -2)
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
            return None
        try:
            batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            return None
        return a, b, batch

    def _byte_gemm_exact(self, k: int) -> bool:
        """The integer GEMM's int32 sums: raw (a - lo) . b (with the byte GEMM's
        corrections for a - lo = 256), and the result."""
        b_bound = max(-self.b_type.lo, self.b_type.hi)
        raw = k * max(self.a_base - self.a_type.lo, self.a_hi - self.a_base) * b_bound
        result = k * max(abs(self.a_type.lo), abs(self.a_hi)) * b_bound
        return self.bytes and raw <= INT32_MAX and result <= self.acc_limit

    def product(self, a, b, plan=None, out_range=(0, 0, 0), storage=None, keep_acc=False):
        """The product (int32), or (when plan is given) its requantization, or None when the
        byte GEMM does not apply to these operands."""
        operands = self._operands(a, b)
        if operands is None:
            return None
        a, b, batch = operands
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        if not self._byte_gemm_exact(k) or 0 in (m, k, n):
            return None
        gemm = self.gemm
        a3 = np.ascontiguousarray(np.broadcast_to(a, batch + (m, k))).reshape(-1, m, k)
        b3 = np.ascontiguousarray(np.broadcast_to(b, batch + (k, n)), dtype=np.int8).reshape(-1, k, n)
        shape = batch + (m, n)
        none = np.empty((0, 0, 0), np.int32)
        if plan is None:
            out = np.empty(a3.shape[:1] + (m, n), np.int32)
            if not gemm.gemm_activations(a3, self.a_base, b3, _NO_PLAN, 0, 0, 0, 0, out, none):
                return None
            return out.reshape(shape)
        out = np.empty(a3.shape[:1] + (m, n), storage)
        acc = np.empty(out.shape, np.int32) if keep_acc else none
        if not gemm.gemm_activations(a3, self.a_base, b3, plan, *out_range, 1, out, acc):
            return None
        return (acc.reshape(shape), out.reshape(shape)) if keep_acc else out.reshape(shape)

    def __call__(self, a, b, *rest):
        if rest or not backend.use_numba():
            return spec.MatMul(a, b, *rest, **self.attrs)
        acc = self.product(a, b)
        if acc is not None:
            return acc
        operands = self._operands(a, b)
        k = np.shape(a)[-2] if self.attrs["transA"] else np.shape(a)[-1]
        if operands is None or k * self.product_bound > min(FLOAT32_EXACT, self.acc_limit):
            return spec.MatMul(a, b, **self.attrs)  # exact int64, or the shape error
        a, b, _ = operands
        # Every sum fits one float32 chunk and the accumulator: the float result is exact.
        return np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(self.out)

    def fuse(self, consumer, run_consumer):
        """As `WeightMatMul.fuse`; operands unfit for the byte GEMM run unfused."""
        if not self.bytes or not hasattr(consumer, "plan_for") or not backend.use_numba():
            return None
        product, out_range, storage = self.product, consumer.out_range, consumer.storage

        def fused(a, b, keep=False):
            n = np.shape(b)[-2] if self.attrs["transB"] else np.shape(b)[-1]
            plan = consumer.plan_for(n)
            result = None if plan is None else product(a, b, plan, out_range, storage, keep_acc=keep)
            if result is None:  # the operands do not suit the byte GEMM: unfused
                acc = self(a, b)
                return acc, run_consumer(acc)
            return result if keep else (None, result)

        return fused


@kernel("MatMul")
def activation_matmul(attrs, consts, declared):
    if consts or len(declared) != 2:
        return None
    return ActivationMatMul(attrs, declared[0].dtype, declared[1].dtype)
