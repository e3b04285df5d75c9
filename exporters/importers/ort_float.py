"""`--float-ops ort`: the constants of onnxruntime's float32 CPU kernels, worked out at import.

Where onnxruntime computes a quantized op in float32, refsim's integer graph can replay it
(the integer variants stay the default, because hardware runs those). Float work happens
here, at import time; the graph gets integer tables and exact (m, e) float32 pairs:

- QLinearAdd / QLinearMul (and the DequantizeLinear pairs -> Add/Mul -> QuantizeLinear
  onnxruntime fuses into them), 8-bit: a `Lut2` table over all 65,536 input pairs,
  filled with the x86-64 AVX2 kernels' float32 arithmetic in their order (below). Exact by
  construction; tested against onnxruntime on every pair.
- Softmax (QLinearSoftmax, and DequantizeLinear -> Softmax -> QuantizeLinear, which
  onnxruntime fuses into it): `OrtSoftmax` with the kernel's 256-entry float32 exp table.
- LayerNormalization between DequantizeLinear and QuantizeLinear, which onnxruntime runs in
  float: `LayerNormRound`, the exact LayerNorm rounded once to the output grid. onnxruntime's
  float32 result differs from the exact one by a few float32 ulps, so an output lying within
  that of a rounding tie can differ by one step: the documented residue (docs/IMPORT.md).

Facts about the kernels (onnxruntime's MLAS, x86-64 with AVX2 and FMA):
QLinearAdd: rA = f32(sA/sC), rB = f32(sB/sC), fixed = f32(zC - fma(rA, zA, f32(rB*zB))),
y = sat(rint(fma(a, rA, fma(b, rB, fixed)))) for the raw (not zero-point-shifted) inputs
a, b; when one operand is a single value over the span the kernel runs, its product is
folded into `fixed` first (f32(fixed + f32(b*rB))). QLinearMul: r = f32(f32(sA*sB)/sC),
y = sat(rint(f32(f32((a-zA)*(b-zB)) * r) + zC)). QLinearSoftmax: table[i] =
f32(exp((i - 255 + k) * sX)) in double with k = max(0, logf(f32(FLT_MAX / D)) - 5) / sX, the
row's float32 sum in index order, y = sat(rint(f32(f32(t*floor(1/sY)) / sum)) + zY).
"""

from __future__ import annotations

import numpy as np

F = np.float32


def _fma(x, y, z) -> np.ndarray:
    # float64 holds x*y exactly (8-bit integer times a float32) and the sum with a float32
    # within 2^-53 relative, so the single rounding to float32 is the fused one.
    return (np.asarray(x, np.float64) * np.asarray(y, np.float64) + np.asarray(z, np.float64)).astype(np.float32)


def _levels(dtype) -> np.ndarray:
    return np.arange(dtype.lo, dtype.hi + 1, dtype=np.int64)


def qlinear_add_table(a, b, out, scalar: str | None = None) -> np.ndarray:
    """Lut2 table of onnxruntime's QLinearAdd: a, b, out are QTensors (dtype, scale, zero point);
    `scalar` names the operand the kernel sees as one value per call ("a", "b" or None)."""
    ra, rb = F(F(a.scale) / F(out.scale)), F(F(b.scale) / F(out.scale))
    za, zb, zc = (F(q.zp_scalar()) for q in (a, b, out))
    fixed = F(zc - _fma(ra, za, F(rb * zb)))
    x, y = np.meshgrid(_levels(a.dtype).astype(np.float32), _levels(b.dtype).astype(np.float32), indexing="ij")
    if scalar == "b":
        value = _fma(x, ra, F(fixed + F(y * rb)))
    elif scalar == "a":
        value = _fma(y, rb, F(fixed + F(x * ra)))
    else:
        value = _fma(x, ra, _fma(y, rb, fixed))
    return np.clip(np.rint(value), out.dtype.lo, out.dtype.hi).astype(out.dtype.storage)


def qlinear_mul_table(a, b, out) -> np.ndarray:
    """Lut2 table of onnxruntime's QLinearMul."""
    r = F(F(F(a.scale) * F(b.scale)) / F(out.scale))
    x, y = np.meshgrid(_levels(a.dtype) - a.zp_scalar(), _levels(b.dtype) - b.zp_scalar(), indexing="ij")
    value = F(F(F(x * y) * r) + F(out.zp_scalar()))
    return np.clip(np.rint(value), out.dtype.lo, out.dtype.hi).astype(out.dtype.storage)


def softmax_table(x_scale, length: int) -> np.ndarray:
    """QLinearSoftmax's float32 exp table for rows of `length` values. The kernel's range
    constant is `log(FLT_MAX / D)` on floats: a float32 quotient and C++'s float overload of
    log (logf), taken here as the correctly rounded float32 logarithm (glibc's logf agrees
    for all D below 70,000 but one)."""
    xs = float(F(x_scale))
    log_range = float(F(np.log(np.float64(F(np.finfo(np.float32).max) / F(length)))))
    shift = max(0.0, log_range - 5.0) / xs
    return np.exp((np.arange(256, dtype=np.float64) - 255 + shift) * xs).astype(np.float32)


def float_softmax_tables(x_scale) -> tuple[int, np.ndarray, np.ndarray]:
    """FloatSoftmax's exp tables for scores x * x_scale (x integers): (k, hi, lo) with
    lo[i] = f32(exp(-i * s)), hi[j] = f32(exp(-j * 2^k * s)), covering differences up to
    104 / s (exp(-104) is below float32's smallest value), k splitting them evenly."""
    s = float(F(x_scale))
    span = 104.0 / s
    k = int(np.clip(np.ceil(np.log2(span) / 2), 0, 24))
    count = int(np.ceil(span / 2.0**k)) + 1
    lo = np.exp(-np.arange(1 << k, dtype=np.float64) * s).astype(np.float32)
    hi = np.exp(-np.arange(count, dtype=np.float64) * (2.0**k * s)).astype(np.float32)
    return k, hi, lo


def softmax_y_factor(y_scale) -> int:
    """floor(1 / y_scale) in float32, the integer the kernel scales probabilities by."""
    return int(np.floor(F(1.0) / F(y_scale)))


def layernorm_params(x, gamma: np.ndarray, beta: np.ndarray, eps: float, out, n: int) -> dict:
    """LayerNormRound's integer parameters for y = gamma * (x - mean) / sqrt(var + eps) + beta
    quantized to `out` (x, out QTensors; x in integer units of its scale)."""
    sx, sy = float(np.asarray(x.scale).reshape(-1)[0]), float(np.asarray(out.scale).reshape(-1)[0])
    bits = x.dtype.bits if x.bound is None else x.bound.bit_length() + 1  # a sum's bound, narrower than its type
    # N^2 * var in integer units is at most N^2 * 4^(bits-1); keep (V + eps) * 4^k below 2^62.
    v_bits = 2 * int(np.ceil(np.log2(n))) + 2 * bits
    k = int(max(0, min(30, (61 - v_bits) // 2)))
    g = np.asarray(gamma, np.float64) / sy
    d_bits = int(np.ceil(np.log2(n))) + bits + 1
    g_bits = int(np.ceil(np.log2(max(float(np.abs(g).max(initial=0)), 2.0**-30)))) + 1
    shift = int(max(0, min(62, 61 - k - d_bits - g_bits)))
    return {
        "gamma": np.rint(g * 2.0**shift).astype(np.int64),
        "beta": np.rint(np.asarray(beta, np.float64) / sy * 2.0**shift).astype(np.int64),
        "eps": int(np.rint(n * n * eps / (sx * sx))),
        "k": k,
        "shift": shift,
    }
