"""Exact integer matrix products with AVX2 (VPMADDWD), from Numba, for CPUs without
AVX-512 VNNI (AMD Zen 2/3, older Intel).

VPMADDWD multiplies, in each 32-bit lane, two signed 16-bit values of one operand by the
two of the other and adds both products exactly into one int32 (no saturation: at most
2 * 2^30). The kernel widens the activation bytes (a - lo in [0, 255]) and the weights
([-128, 127]) to int16, so every product and pair sum is exact and the int32 sums are
exact under the same bounds as the VNNI GEMM (`matmul.int32_exact`). (VPMADDUBSW, the
byte form, saturates its 16-bit pair sums: not exact for full-range weights.)

Register plan of the micro-kernel: MR = 6 rows x NR = 16 columns of C in 12 ymm
accumulators (6 rows x 2 vectors of 8 int32 lanes); each step over 2 values of K loads 2
vectors of B (2 int16 of K for each of 16 columns), broadcasts one int32 word (2 int16
of K) of each of the 6 rows of A, and issues 12 VPMADDWD + 12 VPADDD: 192 multiply-adds
for 8 loads, in the 16 ymm registers.

B is packed once (weights) or per call (activation x activation): panels of 16 columns,
within a panel for each pair of rows of K, 64 bytes ordered [column][row of the pair]
as int16. A is copied per block of rows into a row-major int16 buffer whose rows hold K
padded to a multiple of 2; padded values of A meet zero rows of B, so they are harmless,
and padded rows of C are never used.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..jit import njit, prange
from .epilogue import epilogue, panel_params
from .panels import pack_panels, padded, task_count, task_rows  # noqa: F401  (padded: the engine module's interface)

MR = 6  # rows of C per micro-kernel call
NV = 2  # ymm vectors of C per row
NR = 8 * NV  # columns of C per micro-kernel call (one B panel)
KG = 2  # values of K per VPMADDWD lane
# gemm_activations takes a with a - lo in [A_LOW, A_SPAN]: any int16, since VPMADDWD
# multiplies signed words. A caller with a wider unsigned type (I-BERT's softmax output,
# 0..2^15, stored as uint16) passes lo = its type's low end + 2^15.
A_LOW, A_SPAN = -(1 << 15), (1 << 15) - 1

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V8 = ir.VectorType(_I32, 8)
_W16 = ir.VectorType(_I16, 16)


def _data_pointer(context, builder, array_type, value):
    return cgutils.create_struct_proxy(array_type)(context, builder, value=value).data


@intrinsic
def micro_kernel(typingctx, a, a_off, lda, b, b_off, c, ldc, k_groups):
    """c[0:MR, 0:NR] (int32, row stride ldc) = A[a_off:, MR rows of 2*k_groups int16, row
    stride lda (in int16)] . the packed B panel at b_off (int16 index; k_groups groups of
    2 * NR int16)."""
    sig = types.void(a, types.int64, types.int64, b, types.int64, c, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        a_v, a_off, lda, b_v, b_off, c_v, ldc, k_groups = args
        arg_types = signature.args
        pmaddwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8, [_W16, _W16]), "llvm.x86.avx2.pmadd.wd")
        a_base = builder.gep(builder.bitcast(_data_pointer(context, builder, arg_types[0], a_v), _I16.as_pointer()), [a_off])
        b_base = builder.gep(builder.bitcast(_data_pointer(context, builder, arg_types[3], b_v), _I16.as_pointer()), [b_off])
        c_base = builder.bitcast(_data_pointer(context, builder, arg_types[5], c_v), _I32.as_pointer())
        zero = ir.Constant(_V8, [0] * 8)
        undef = ir.Constant(_V8, ir.Undefined)
        broadcast_mask = ir.Constant(ir.VectorType(_I32, 8), [0] * 8)

        entry = builder.block
        loop = builder.append_basic_block("k_group")
        done = builder.append_basic_block("k_done")
        builder.cbranch(builder.icmp_signed(">", k_groups, ir.Constant(_I64, 0)), loop, done)

        builder.position_at_end(loop)
        g = builder.phi(_I64)
        g.add_incoming(ir.Constant(_I64, 0), entry)
        accs = []
        for _ in range(MR * NV):
            phi = builder.phi(_V8)
            phi.add_incoming(zero, entry)
            accs.append(phi)
        b_step = builder.gep(b_base, [builder.mul(g, ir.Constant(_I64, KG * NR))])
        b_vecs = [
            builder.load(builder.bitcast(builder.gep(b_step, [ir.Constant(_I64, 16 * v)]), _W16.as_pointer()), align=2)
            for v in range(NV)
        ]
        a_step = builder.gep(a_base, [builder.mul(g, ir.Constant(_I64, KG))])
        updated = []
        for r in range(MR):
            word = builder.load(builder.bitcast(builder.gep(a_step, [builder.mul(lda, ir.Constant(_I64, r))]), _I32.as_pointer()), align=2)
            a_vec = builder.shuffle_vector(builder.insert_element(undef, word, ir.Constant(_I32, 0)), undef, broadcast_mask)
            a_words = builder.bitcast(a_vec, _W16)
            for v in range(NV):
                updated.append(builder.add(accs[r * NV + v], builder.call(pmaddwd, [a_words, b_vecs[v]])))
        following = builder.add(g, ir.Constant(_I64, 1))
        g.add_incoming(following, loop)
        for phi, value in zip(accs, updated):
            phi.add_incoming(value, loop)
        builder.cbranch(builder.icmp_signed("<", following, k_groups), loop, done)

        builder.position_at_end(done)
        results = []
        for i in range(MR * NV):
            phi = builder.phi(_V8)
            phi.add_incoming(zero, entry)
            phi.add_incoming(updated[i], loop)
            results.append(phi)
        for r in range(MR):
            row = builder.gep(c_base, [builder.mul(ldc, ir.Constant(_I64, r))])
            for v in range(NV):
                builder.store(results[r * NV + v], builder.bitcast(builder.gep(row, [ir.Constant(_I64, 8 * v)]), _V8.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def pack_b(b: np.ndarray) -> np.ndarray:
    """Pack a (K, N) matrix of values in [-128, 127] into int16 panels (flat)."""
    return pack_panels(b, KG, NR, np.int16)


@njit(cache=True, parallel=True)
def gemm_weight(a, lo, packed, kp, n, corr, plan, out_lo, out_hi, mode, requant, out, acc_out, threads):
    """`vnni.gemm_weight` (same arguments and results) on the AVX2 micro-kernel: packed
    comes from this module's `pack_b`; corr must fit int32 (`matmul.int32_exact`). Its
    tasks are row blocks only (`panels.task_count`): threads is taken for the common
    interface and not used."""
    m, k = a.shape
    k_groups = kp // KG
    panels = (n + NR - 1) // NR
    blocks = (m + MR - 1) // MR
    if blocks == 0:  # no rows of A: nothing to compute (and no tasks to divide them among)
        return
    tasks = task_count(blocks)
    keep_acc = acc_out.shape[0] > 0
    add = corr.astype(np.int32)
    for g in prange(tasks):
        row0, rows, nblocks = task_rows(g, tasks, blocks, MR, m)
        abuf = np.zeros((nblocks * MR, kp), np.int16)
        for i in range(rows):
            for kk in range(k):
                abuf[i, kk] = np.int16(a[row0 + i, kk]) - np.int16(lo)
        flat_a = abuf.reshape(-1)
        tile = np.empty((nblocks * MR, NR), np.int32)
        panel_plan, panel_add = np.zeros((plan.shape[0], NR), np.int64), np.zeros(NR, np.int32)
        for p in range(panels):
            b_off = p * k_groups * KG * NR
            for bb in range(nblocks):
                micro_kernel(flat_a, bb * MR * kp, kp, packed, b_off, tile[bb * MR:], NR, k_groups)
            cols = min(NR, n - p * NR)
            panel_params(plan, add, p * NR, cols, requant, panel_plan, panel_add)
            epilogue(tile, rows, row0, p * NR, cols, panel_add, panel_plan, out_lo, out_hi, mode, requant, out,
                      acc_out, keep_acc)


@njit(cache=True, parallel=True)
def gemm_activations(a, lo, b, plan, out_lo, out_hi, mode, requant, out, acc_out):
    """`vnni.gemm_activations` (same arguments and results) on the AVX2 micro-kernel, for
    a with a - lo in [A_LOW, A_SPAN] (an int16). Returns False, leaving out unfinished, if a
    value of a lies outside (a type wider than its values: the caller's bounds assumed it)."""
    stacks, m, k = a.shape
    n = b.shape[2]
    kp = (k + KG - 1) // KG * KG
    k_groups = kp // KG
    panels = (n + NR - 1) // NR
    blocks = (m + MR - 1) // MR
    keep_acc = acc_out.shape[0] > 0
    fits = np.ones(stacks, np.bool_)
    for t in prange(stacks):
        packed = np.zeros(panels * k_groups * KG * NR, np.int16)
        colsum = np.zeros(n, np.int64)
        for kk in range(k):
            g, q = kk // KG, kk % KG
            for j in range(n):
                v = b[t, kk, j]
                colsum[j] += v
                packed[((j // NR) * k_groups + g) * KG * NR + (j % NR) * KG + q] = np.int16(v)
        abuf = np.zeros((blocks * MR, kp), np.int16)
        smallest, largest = np.int64(0), np.int64(0)  # scalars, not fits[t]: the copy vectorizes
        if kp == k:  # rows without padding: one loop over the matrix, as in vnni
            src, dst = a[t].reshape(-1), abuf.reshape(-1)
            for i in range(m * k):
                v = np.int64(src[i]) - lo
                smallest, largest = min(smallest, v), max(largest, v)
                dst[i] = np.int16(v)
        else:
            for i in range(m):
                row, dst = a[t, i], abuf[i]
                for kk in range(k):
                    v = np.int64(row[kk]) - lo
                    smallest, largest = min(smallest, v), max(largest, v)
                    dst[kk] = np.int16(v)
        if largest > A_SPAN or smallest < A_LOW:
            fits[t] = False
            continue
        add = (lo * colsum).astype(np.int32)  # |lo * colsum| <= the result bound the caller checked
        flat_a = abuf.reshape(-1)
        tile = np.empty((blocks * MR, NR), np.int32)
        acc_t = acc_out[t] if keep_acc else acc_out.reshape((0, 0))
        panel_plan, panel_add = np.zeros((plan.shape[0], NR), np.int64), np.zeros(NR, np.int32)
        for p in range(panels):
            b_off = p * k_groups * KG * NR
            for bb in range(blocks):
                micro_kernel(flat_a, bb * MR * kp, kp, packed, b_off, tile[bb * MR:], NR, k_groups)
            cols = min(NR, n - p * NR)
            panel_params(plan, add, p * NR, cols, requant, panel_plan, panel_add)
            epilogue(tile, m, 0, p * NR, cols, panel_add, panel_plan, out_lo, out_hi, mode, requant, out[t],
                      acc_t, keep_acc)
    return fits.all()
