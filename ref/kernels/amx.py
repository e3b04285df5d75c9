"""Exact u8 x s8 matrix products on Intel AMX tiles (TDPBUSD), from Numba.

TDPBUSD multiplies unsigned bytes by signed bytes and adds groups of four products into
int32 lanes without any intermediate rounding or saturation, so as long as no int32 sum
overflows (checked by the caller from the operand bounds) the result is exact.

Tile plan, one 32 x 32 block of C per task:

    tmm0 tmm1   C rows 0-15, columns 0-15 | 16-31   (16 x 16 int32 each)
    tmm2 tmm3   C rows 16-31
    tmm4 tmm5   A rows 0-15 | 16-31, 64 bytes of K  (16 x 64 u8)
    tmm6 tmm7   B for columns 0-15 | 16-31, 64 of K (16 rows x 64 bytes, "VNNI" order)

B is packed once per weight: for each 32-column panel and each 64-deep slice of K, two
1 KiB tiles whose row r holds, for each of 16 columns, the four bytes b[4r..4r+3][col].
A is copied per call into a buffer padded to 32 rows and 64 columns. Padded columns of
A meet zero rows of B, so their contents do not matter; padded rows of C are dropped.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .panels import padded

_I8 = ir.IntType(8)
_I64 = ir.IntType(64)
_VOID = ir.VoidType()
_I8P = _I8.as_pointer()

BLOCK_M = 32  # rows of C per task
BLOCK_N = 32  # columns of C per task
BLOCK_K = 64  # bytes of K per tile step


def tile_config() -> np.ndarray:
    """The 64-byte LDTILECFG record: palette 1, eight 16 x 64-byte tiles."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    cfg[16:32].view(np.uint16)[:] = 64  # bytes per row of tiles 0-7
    cfg[48:56] = 16  # rows of tiles 0-7
    return cfg


def _data_pointer(context, builder, array_type, value):
    return builder.bitcast(cgutils.create_struct_proxy(array_type)(context, builder, value=value).data, _I8P)


@intrinsic
def _block_32x32(typingctx, cfg, a, a_off, lda, b, b_off, c, c_off, ldc, k_steps):
    """C[c_off:, 32 x 32] = A[a_off:, 32 rows x 64*k_steps] . B(panel at b_off).

    Offsets and leading dimensions are in elements (bytes for A and B, int32 for C).
    """
    sig = types.void(cfg, a, types.int64, types.int64, b, types.int64, c, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        cfg_v, a_v, a_off, lda, b_v, b_off, c_v, c_off, ldc, k_steps = args
        arg_types = signature.args
        module = builder.module

        def intrinsic_fn(name, *arg_types_):
            return cgutils.get_or_insert_function(module, ir.FunctionType(_VOID, list(arg_types_)), name)

        ldtilecfg = intrinsic_fn("llvm.x86.ldtilecfg", _I8P)
        tileload = intrinsic_fn("llvm.x86.tileloadd64", _I8, _I8P, _I64)
        tilestore = intrinsic_fn("llvm.x86.tilestored64", _I8, _I8P, _I64)
        tdpbusd = intrinsic_fn("llvm.x86.tdpbusd", _I8, _I8, _I8)
        tilezero = intrinsic_fn("llvm.x86.tilezero", _I8)

        def tile(n):
            return ir.Constant(_I8, n)

        def const(n):
            return ir.Constant(_I64, n)

        builder.call(ldtilecfg, [_data_pointer(context, builder, arg_types[0], cfg_v)])
        for t in range(4):
            builder.call(tilezero, [tile(t)])
        a_base = builder.gep(_data_pointer(context, builder, arg_types[1], a_v), [a_off])
        b_base = builder.gep(_data_pointer(context, builder, arg_types[4], b_v), [b_off])
        c_ptr = _data_pointer(context, builder, arg_types[6], c_v)

        entry = builder.block
        loop = builder.append_basic_block("k_step")
        done = builder.append_basic_block("k_done")
        builder.cbranch(builder.icmp_signed(">", k_steps, const(0)), loop, done)
        builder.position_at_end(loop)
        step = builder.phi(_I64)
        step.add_incoming(const(0), entry)
        k_byte = builder.mul(step, const(BLOCK_K))
        a_rows_16 = builder.mul(lda, const(16))
        b_panel = builder.mul(step, const(2 * 16 * 64))
        builder.call(tileload, [tile(4), builder.gep(a_base, [k_byte]), lda])
        builder.call(tileload, [tile(5), builder.gep(a_base, [builder.add(k_byte, a_rows_16)]), lda])
        builder.call(tileload, [tile(6), builder.gep(b_base, [b_panel]), const(64)])
        builder.call(tileload, [tile(7), builder.gep(b_base, [builder.add(b_panel, const(16 * 64))]), const(64)])
        builder.call(tdpbusd, [tile(0), tile(4), tile(6)])
        builder.call(tdpbusd, [tile(1), tile(4), tile(7)])
        builder.call(tdpbusd, [tile(2), tile(5), tile(6)])
        builder.call(tdpbusd, [tile(3), tile(5), tile(7)])
        following = builder.add(step, const(1))
        step.add_incoming(following, builder.block)
        builder.cbranch(builder.icmp_signed("<", following, k_steps), loop, done)

        builder.position_at_end(done)
        c_base = builder.gep(c_ptr, [builder.mul(c_off, const(4))])
        row_bytes = builder.mul(ldc, const(4))
        rows_16 = builder.mul(row_bytes, const(16))
        builder.call(tilestore, [tile(0), c_base, row_bytes])
        builder.call(tilestore, [tile(1), builder.gep(c_base, [const(64)]), row_bytes])
        builder.call(tilestore, [tile(2), builder.gep(c_base, [rows_16]), row_bytes])
        builder.call(tilestore, [tile(3), builder.gep(c_base, [builder.add(rows_16, const(64))]), row_bytes])
        # Release the tiles: a thread holding tile state makes every context switch save
        # and restore 8 KiB more.
        builder.call(intrinsic_fn("llvm.x86.tilerelease"), [])
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, cache=True)
def _gemm(cfg, a_padded, packed_b, k_padded, n_padded, m_padded):
    c = np.empty((m_padded, n_padded), np.int32)
    flat_c = c.reshape(-1)
    panels = n_padded // BLOCK_N
    row_blocks = m_padded // BLOCK_M
    k_steps = k_padded // BLOCK_K
    panel_bytes = k_steps * 2 * 16 * 64
    for task in prange(row_blocks * panels):
        rb = task // panels
        panel = task % panels
        _block_32x32(
            cfg, a_padded, rb * BLOCK_M * k_padded, k_padded,
            packed_b, panel * panel_bytes,
            flat_c, rb * BLOCK_M * n_padded + panel * BLOCK_N, n_padded, k_steps,
        )
    return c


def pack_b(b: np.ndarray) -> np.ndarray:
    """Pack a (K, N) matrix of values in [-128, 127] into AMX B tiles (flat int8)."""
    k, n = b.shape
    kp, np_ = padded(k, BLOCK_K), padded(n, BLOCK_N)
    full = np.zeros((kp, np_), np.int8)
    full[:k, :n] = b
    # Axes of the reshape: k-step, tile row r, byte t of the group of four, panel, half, column.
    tiles = full.reshape(kp // BLOCK_K, 16, 4, np_ // BLOCK_N, 2, 16)
    return np.ascontiguousarray(tiles.transpose(3, 0, 4, 1, 5, 2)).reshape(-1)


_CONFIG = tile_config()


def gemm_u8s8(a_u8: np.ndarray, packed_b: np.ndarray, k: int, n: int) -> np.ndarray:
    """(M, K) uint8 times the packed (K, N) int8 matrix -> (M, N) int32 view, exact."""
    m = a_u8.shape[0]
    mp, kp, np_ = padded(max(m, 1), BLOCK_M), padded(k, BLOCK_K), padded(n, BLOCK_N)
    if mp == m and kp == k and a_u8.flags.c_contiguous:
        a = a_u8
    else:
        a = np.empty((mp, kp), np.uint8)
        a[:m, :k] = a_u8
    c = _gemm(_CONFIG, a.reshape(-1), packed_b, kp, np_, mp)
    return c[:m, :n]
