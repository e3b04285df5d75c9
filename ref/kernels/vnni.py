"""Exact u8 x s8 matrix products with AVX-512 VNNI (VPDPBUSD), from Numba.

VPDPBUSD multiplies, in each 32-bit lane, four unsigned bytes of one operand by the four
signed bytes of the other and adds the four products to the lane's int32, with no
intermediate rounding or saturation: exact as long as no int32 sum overflows (the caller
checks that from the operand bounds).

Register plan of the micro-kernel: a block of MR = 8 rows x NR = 48 columns of C lives in
24 zmm accumulators (8 rows x 3 vectors of 16 int32 lanes) for the whole reduction. Each
step over 4 values of K loads 3 vectors of B (the 4 bytes of K for each of 48 columns) and
broadcasts 4 bytes of each of the 8 rows of A, then issues 24 VPDPBUSD: 1536 multiply-adds
for 11 loads. Measured here against 6 x 64 and 12 x 32 (same 24 accumulators), B in L1,
128 rows: 8 x 48 ran 300-330 GMAC/s on one core where 6 x 64 ran 265-290 (128 rows are 16
blocks of 8, where blocks of 6 compute 132) and 12 x 32 255-300. The micro-kernel alone,
operands in L1, runs about 300-320 GMAC/s: two VPDPBUSD zmm per cycle, near enough.

B is packed once (weights) or per call (activation x activation): panels of NR columns,
and within a panel, for each group of 4 rows of K, NR * 4 bytes ordered [column][byte of
the group]. A is a row-major uint8 buffer whose rows hold K padded to a multiple of 4;
padded bytes of A meet zero rows of B, so they are harmless, and padded rows of C are
never used.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..jit import njit, prange
from .epilogue import epilogue, panel_params
from .panels import pack_panels, padded, share, task_grid  # noqa: F401  (padded: the engine module's interface)

MR = 8  # rows of C per micro-kernel call
NV = 3  # zmm vectors of C per row
NR = 16 * NV  # columns of C per micro-kernel call (one B panel)
KG = 4  # bytes of K per VPDPBUSD lane
A_LOW, A_SPAN = 0, 256  # gemm_activations takes a with a - lo in [A_LOW, A_SPAN]
# A chunk of K whose B panel slice stays in L1 (48 KiB here) beside the rows of A and C
# streaming past it: gemm_weight reads it once per row block.
B_CHUNK_BYTES = 24 << 10
B_CHUNK_GROUPS = B_CHUNK_BYTES // (KG * NR)
# At most this much of A per task (its copy, read once per panel, stays in L2: 1.25 MiB here).
A_TASK_BYTES = 512 << 10

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16 = ir.VectorType(_I32, 16)


def _data_pointer(context, builder, array_type, value):
    return cgutils.create_struct_proxy(array_type)(context, builder, value=value).data


@intrinsic
def micro_kernel(typingctx, a, a_off, lda, b, b_off, c, ldc, k_groups, accumulate):
    """c[0:MR, 0:NR] (int32, row stride ldc) = A[a_off:, MR rows of 4*k_groups bytes, row
    stride lda] . the packed B panel at b_off (k_groups groups of NR * 4 bytes), plus what c
    held if accumulate (a later chunk of K: `gemm_weight`)."""
    sig = types.void(a, types.int64, types.int64, b, types.int64, c, types.int64, types.int64, types.boolean)

    def codegen(context, builder, signature, args):
        a_v, a_off, lda, b_v, b_off, c_v, ldc, k_groups, accumulate = args
        arg_types = signature.args
        vpdpbusd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]), "llvm.x86.avx512.vpdpbusd.512"
        )
        a_base = builder.gep(builder.bitcast(_data_pointer(context, builder, arg_types[0], a_v), _I8.as_pointer()), [a_off])
        b_base = builder.gep(builder.bitcast(_data_pointer(context, builder, arg_types[3], b_v), _I8.as_pointer()), [b_off])
        c_base = builder.bitcast(_data_pointer(context, builder, arg_types[5], c_v), _I32.as_pointer())
        zero = ir.Constant(_V16, [0] * 16)
        undef = ir.Constant(_V16, ir.Undefined)
        broadcast_mask = ir.Constant(_V16, [0] * 16)

        def c_vector(r, v):
            row = builder.gep(c_base, [builder.mul(ldc, ir.Constant(_I64, r))])
            return builder.bitcast(builder.gep(row, [ir.Constant(_I64, 16 * v)]), _V16.as_pointer())

        entry = builder.block
        load = builder.append_basic_block("c_load")
        start = builder.append_basic_block("c_ready")
        loop = builder.append_basic_block("k_group")
        done = builder.append_basic_block("k_done")
        builder.cbranch(builder.trunc(accumulate, ir.IntType(1)) if accumulate.type != ir.IntType(1) else accumulate,
                        load, start)

        builder.position_at_end(load)
        loaded = [builder.load(c_vector(r, v), align=4) for r in range(MR) for v in range(NV)]
        builder.branch(start)

        builder.position_at_end(start)
        initial = []
        for i in range(MR * NV):
            phi = builder.phi(_V16)
            phi.add_incoming(zero, entry)
            phi.add_incoming(loaded[i], load)
            initial.append(phi)
        builder.cbranch(builder.icmp_signed(">", k_groups, ir.Constant(_I64, 0)), loop, done)

        builder.position_at_end(loop)
        g = builder.phi(_I64)
        g.add_incoming(ir.Constant(_I64, 0), start)
        accs = []
        for i in range(MR * NV):
            phi = builder.phi(_V16)
            phi.add_incoming(initial[i], start)
            accs.append(phi)
        b_step = builder.gep(b_base, [builder.mul(g, ir.Constant(_I64, KG * NR))])
        b_vecs = [
            builder.load(builder.bitcast(builder.gep(b_step, [ir.Constant(_I64, 64 * v)]), _V16.as_pointer()), align=1)
            for v in range(NV)
        ]
        a_step = builder.gep(a_base, [builder.mul(g, ir.Constant(_I64, KG))])
        updated = []
        for r in range(MR):
            word = builder.load(builder.bitcast(builder.gep(a_step, [builder.mul(lda, ir.Constant(_I64, r))]), _I32.as_pointer()), align=1)
            a_vec = builder.shuffle_vector(builder.insert_element(undef, word, ir.Constant(_I32, 0)), undef, broadcast_mask)
            for v in range(NV):
                updated.append(builder.call(vpdpbusd, [accs[r * NV + v], a_vec, b_vecs[v]]))
        following = builder.add(g, ir.Constant(_I64, 1))
        g.add_incoming(following, loop)
        for phi, value in zip(accs, updated):
            phi.add_incoming(value, loop)
        builder.cbranch(builder.icmp_signed("<", following, k_groups), loop, done)

        builder.position_at_end(done)
        results = []
        for i in range(MR * NV):
            phi = builder.phi(_V16)
            phi.add_incoming(initial[i], start)
            phi.add_incoming(updated[i], loop)
            results.append(phi)
        for i, value in enumerate(results):
            builder.store(value, c_vector(i // NV, i % NV), align=4)
        return context.get_dummy_value()

    return sig, codegen


def pack_b(b: np.ndarray) -> np.ndarray:
    """Pack a (K, N) matrix of values in [-128, 127] into VNNI panels (flat int8)."""
    return pack_panels(b, KG, NR, np.int8)


@njit(cache=True, inline="always")
def _copy_shifted(a, row0, rows, k, lo, abuf):
    """abuf[i, :k] = a[row0 + i, :] - lo as bytes (the caller's bounds put it in [0, 255])."""
    for i in range(rows):
        for kk in range(k):
            abuf[i, kk] = np.uint8(np.int64(a[row0 + i, kk]) - lo)


@njit(cache=True, parallel=True)
def gemm_weight(a, lo, packed, kp, n, corr, plan, out_lo, out_hi, mode, requant, out, acc_out, threads):
    """out = epilogue((a - lo) . B + corr) for a (M, K) integer matrix and the packed (K, N)
    int8 matrix B; corr (int64, one per column, within int32: `matmul.int32_exact`) folds in
    zero points and bias.

    requant = 0: out (int32) receives the sum; 1: out receives its requantization by
    `plan` (see kernels.requant). acc_out, if it has rows, also receives the int32 sum
    (a traced run sees the intermediate the fusion skips). threads: how many threads run
    this call (1 for the sequential twin), which shapes the tasks (`panels.task_grid`), never
    the result.

    Each task takes a block of rows (its A copied once, within L2) and a range of B panels;
    for each panel it runs K in chunks whose B fits L1 (B_CHUNK_BYTES) through all its row
    blocks, then the epilogue on the panel's tile while it is in cache. With few rows (a
    batch of one) the tasks split the columns: each thread streams only its share of B.
    """
    m, k = a.shape
    k_groups = kp // KG
    panels = (n + NR - 1) // NR
    blocks = (m + MR - 1) // MR
    if blocks == 0:  # no rows of A: nothing to compute (and no tasks to divide them among)
        return
    row_tasks, col_tasks = task_grid(blocks, MR * kp, panels, threads, A_TASK_BYTES)
    chunks = (k_groups + B_CHUNK_GROUPS - 1) // B_CHUNK_GROUPS
    keep_acc = acc_out.shape[0] > 0
    add = corr.astype(np.int32)  # the caller's bounds (matmul.int32_exact) keep it and every sum in int32
    for t in prange(row_tasks * col_tasks):
        first_block, last_block = share(t // col_tasks, row_tasks, blocks)
        first_panel, last_panel = share(t % col_tasks, col_tasks, panels)
        nblocks = last_block - first_block
        row0 = first_block * MR
        rows = min(m - row0, nblocks * MR)
        abuf = np.zeros((nblocks * MR, kp), np.uint8)
        _copy_shifted(a, row0, rows, k, lo, abuf)
        flat_a = abuf.reshape(-1)
        tile = np.empty((nblocks * MR, NR), np.int32)
        panel_plan, panel_add = np.zeros((plan.shape[0], NR), np.int64), np.zeros(NR, np.int32)
        for p in range(first_panel, last_panel):
            for c in range(chunks):
                g0, g1 = share(c, chunks, k_groups)
                b_off = (p * k_groups + g0) * KG * NR
                for bb in range(nblocks):
                    micro_kernel(flat_a, bb * MR * kp + g0 * KG, kp, packed, b_off, tile[bb * MR:], NR, g1 - g0, c > 0)
            cols = min(NR, n - p * NR)
            panel_params(plan, add, p * NR, cols, requant, panel_plan, panel_add)
            epilogue(tile, rows, row0, p * NR, cols, panel_add, panel_plan, out_lo, out_hi, mode, requant, out,
                     acc_out, keep_acc)


@njit(cache=True, inline="always")
def _pack_stack(b, k_groups, panels):
    """`pack_b` of one computed (K, N) matrix, inside a kernel, as uint32 words (the
    micro-kernel reads bytes): each whole group of 4 rows of K in one vectorizing loop per
    panel that assembles each column's 4 bytes into a word. Writing byte by byte at an
    index computed per element (with a division by NR) cost more than the GEMM itself for
    attention's K = 32 (22 us for MiniLM's 12 heads of 32 x 128; 11 us so)."""
    k, n = b.shape
    packed = np.zeros(panels * k_groups * NR, np.uint32)
    whole = k // KG
    for p in range(panels):
        c0 = p * NR
        cols = min(NR, n - c0)
        for g in range(whole):
            r0, r1 = b[KG * g, c0:c0 + cols], b[KG * g + 1, c0:c0 + cols]
            r2, r3 = b[KG * g + 2, c0:c0 + cols], b[KG * g + 3, c0:c0 + cols]
            dst = packed[(p * k_groups + g) * NR:]
            for jj in range(cols):
                dst[jj] = (np.uint32(np.uint8(r0[jj])) | (np.uint32(np.uint8(r1[jj])) << np.uint32(8))
                           | (np.uint32(np.uint8(r2[jj])) << np.uint32(16)) | (np.uint32(np.uint8(r3[jj])) << np.uint32(24)))
        if whole < k_groups:  # the last, partial group: its missing rows stay zero
            dst = packed[(p * k_groups + whole) * NR:]
            for q in range(k - whole * KG):
                row = b[whole * KG + q, c0:c0 + cols]
                for jj in range(cols):
                    dst[jj] |= np.uint32(np.uint8(row[jj])) << np.uint32(8 * q)
    return packed


@njit(cache=True, parallel=True)
def gemm_activations(a, lo, b, plan, out_lo, out_hi, mode, requant, out, acc_out):
    """out[t] = epilogue(a[t] . b[t]) for stacks of computed matrices: a (T, M, K) with
    values in [lo, lo + 256], b (T, K, N) with values in [-128, 127]; each b[t] is packed
    here. A value of exactly lo + 256 enters the byte GEMM as 255 and its row gets the
    missing b[k, :] added afterwards (I-BERT's softmax output, 0..256, is one such type).
    requant and acc_out as in `gemm_weight`. Returns False, leaving out unfinished, if a
    value of a lies outside [lo, lo + 256] (a type wider than its values: the caller checks).
    """
    stacks, m, k = a.shape
    n = b.shape[2]
    kp = (k + KG - 1) // KG * KG
    k_groups = kp // KG
    panels = (n + NR - 1) // NR
    blocks = (m + MR - 1) // MR
    keep_acc = acc_out.shape[0] > 0
    fits = np.ones(stacks, np.bool_)
    for t in prange(stacks):
        packed = _pack_stack(b[t], k_groups, panels)
        colsum = np.zeros(n, np.int64)
        for kk in range(k):  # a loop of its own: it vectorizes
            row = b[t, kk]
            for j in range(n):
                colsum[j] += row[j]
        abuf = np.zeros((blocks * MR, kp), np.uint8)
        smallest, largest = np.int64(0), np.int64(0)  # scalars and no branch: the copy vectorizes
        if kp == k:  # rows without padding: one loop over the matrix (rows of 32 bytes are
            src, dst = a[t].reshape(-1), abuf.reshape(-1)  # too short for a vector loop each)
            for i in range(m * k):
                v = np.int64(src[i]) - lo
                smallest, largest = min(smallest, v), max(largest, v)
                dst[i] = np.uint8(min(v, 255))
        else:
            for i in range(m):
                row, dst = a[t, i], abuf[i]
                for kk in range(k):
                    v = np.int64(row[kk]) - lo
                    smallest, largest = min(smallest, v), max(largest, v)
                    dst[kk] = np.uint8(min(v, 255))
        if smallest < 0 or largest > 256:  # beyond the caller's bounds: reported, not wrapped
            fits[t] = False
            continue
        wide = np.zeros(m, np.bool_)
        if largest == 256:
            for i in range(m):
                for kk in range(k):
                    wide[i] |= np.int64(a[t, i, kk]) - lo == 256
        add = (lo * colsum).astype(np.int32)  # |lo * colsum| <= the result bound the caller checked
        flat_a = abuf.reshape(-1)
        tile = np.empty((blocks * MR, NR), np.int32)
        acc_t = acc_out[t] if keep_acc else acc_out.reshape((0, 0))
        panel_plan, panel_add = np.zeros((plan.shape[0], NR), np.int64), np.zeros(NR, np.int32)
        for p in range(panels):
            b_off = p * k_groups * KG * NR
            for bb in range(blocks):
                micro_kernel(flat_a, bb * MR * kp, kp, packed, b_off, tile[bb * MR:], NR, k_groups, False)
            c0 = p * NR
            cols = min(NR, n - c0)
            for i in range(m):  # the rows holding lo + 256, which entered as 255
                if wide[i]:
                    for kk in range(k):
                        if np.int64(a[t, i, kk]) - lo > 255:
                            for jj in range(cols):
                                tile[i, jj] += b[t, kk, c0 + jj]
            panel_params(plan, add, c0, cols, requant, panel_plan, panel_add)
            epilogue(tile, m, 0, c0, cols, panel_add, panel_plan, out_lo, out_hi, mode, requant, out[t], acc_t,
                     keep_acc)
    return fits.all()
