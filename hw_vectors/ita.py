"""Target `ita`: the files ITA's testbenches read, laid out as PyITA writes them.

For every attention block recorded in the graph (docs/ITA.md) and every sample, the folder
`ita/<block>/` gets

    standalone/   decimal tile streams, one value per line, for ita_tb.sv
    hwpe/         32-bit hex memory image (mem.txt) and expected outputs, for ita_hwpe_tb.sv
    RQS_MUL.txt, RQS_SHIFT.txt, RQS_ADD.txt   requantization parameters, one row per head

ITA computes a matrix product out[R, N] = A[R, K] . B[K, N] in 64 x 64 tiles with 16
processing elements, and every step's files follow from four streams (M = 64, N_PE = 16):

- input stream of A: for each row tile i, for each output column tile y, for each inner
  tile j, the 64 rows of tile A(i, j), all 64 sent M / N_PE = 4 times;
- weight stream of B^T [N, K]: for each column tile y, for each inner tile j, the 64 rows
  of tile B^T(y, j); the whole stream repeated once per row tile of the output;
- output stream of out: for each row tile i, for each 16-wide column group c, the 64 rows
  of out[i*64:(i+1)*64, c*16:(c+1)*16], 16 values each;
- bias stream: the output stream of the bias broadcast to the output's shape.

The steps (file names are PyITA's; h is the head):

    Q   out Qp[S,P]   = Q[S,E] . Wq           input Q        weight Wq_h      bias Bq_h  output Qp_h
    K   out Kp[S,P]   = K[S,E] . Wk           input K        weight Wk_h      bias Bk_h  output Kp_h
    V   out Vp^T[P,S] = Wv^T[P,E] . V^T       input Wv_h     weight V         bias Bv_h  output Vp_h
    QK  out A[S,S]    = Qp . Kp^T             input Qp_in_h  weight Kp_in_h              output A_h
    AV  out O[S,P]    = softmax(A) . Vp       input A_stream_soft_in_h (A before the softmax,
                                              which ITA computes on the fly)
                                                             weight Vp_in_h              output O_soft_h
    OW  out[S,E]      = O . Wo                input O_soft_in_h weight Wo_h   bias Bo_h  output Out_soft_h

plus A_soft_h, the softmax output [S, S] row-major, and (one head only) A_soft_in, that
matrix four times over, one row per line. Files have no newline after the last value, as
PyITA writes them. The V step computes Vp transposed, so its bias stream is Bv broadcast
along rows of [P, S].

Where PyITA fails, refsim does the evident thing and says so in docs/GOLDEN.md: PyITA's
standalone bias files raise for more than one head; refsim writes each head's bias as the
one-head layout would.
"""

from __future__ import annotations

import numpy as np
from refsim.blocks.ita import ITA_TILE, attention_records, ita_constraints, read_block
from refsim.errors import GraphError
from refsim.golden.memh import encode_words, format_words
from refsim.golden.names import FileNames

ITA_M = ITA_TILE
ITA_N = 16
NEEDS_ALL_TENSORS = True


def describe(options) -> dict:
    return {
        "layout": "PyITA standalone/ decimal tile streams and hwpe/ 32-bit hex memory image, per attention block",
        "tile": [ITA_M, ITA_N],
    }


def check(graph, options) -> None:
    records = attention_records(graph)
    if not records:
        raise GraphError(
            "target ita: the model records no ITA attention blocks (metadata attention_blocks); "
            "export it with `refsim export --mode ita` or build blocks with refsim.blocks.ita"
        )
    for record in records:
        block = read_block(graph, record)
        problems = ita_constraints(graph, block, record.get("S"))
        if problems:
            raise GraphError(f"attention block {block.name!r} does not fit ITA: " + "; ".join(problems))


# --- the four streams -------------------------------------------------------------------


def tiles(m: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[R/rows, C/cols, rows, cols]: tile (i, j) of m at [i, j], tiles in row-major order."""
    r, c = m.shape
    return m.reshape(r // rows, rows, c // cols, cols).transpose(0, 2, 1, 3)


def input_stream(a: np.ndarray, n_out: int, m: int = ITA_M, n: int = ITA_N) -> np.ndarray:
    """Rows of m values: for i (row tiles), for y (output column tiles), for j (inner
    tiles): tile A(i, j)'s m rows, m // n times over."""
    t = np.tile(tiles(a, m, m), (1, 1, m // n, 1))
    return np.tile(t, (1, n_out // m, 1, 1)).reshape(-1, m)


def weight_stream(bt: np.ndarray, r_out: int, m: int = ITA_M) -> np.ndarray:
    """Rows of m values: the tiles of B^T [N, K] row-major, repeated r_out // m times."""
    return np.tile(tiles(bt, m, m).reshape(-1, m), (r_out // m, 1))


def output_stream(out: np.ndarray, m: int = ITA_M, n: int = ITA_N) -> np.ndarray:
    """Rows of n values: m x n tiles of out, row-major."""
    return tiles(out, m, n).reshape(-1, n)


# --- text formats -----------------------------------------------------------------------


def decimal_lines(values: np.ndarray) -> bytes:
    """One decimal value per line, no newline after the last (PyITA's write_matrix)."""
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    if flat.size == 0:
        return b""
    lo, hi = int(flat.min()), int(flat.max())
    if hi - lo < 1 << 16:  # 8-bit data: format each distinct value once (streams reach 8M values)
        table = np.array([str(v).encode() for v in range(lo, hi + 1)], dtype=object)
        return b"\n".join(table[flat - lo].tolist())
    return "\n".join(map(str, flat.tolist())).encode()


def decimal_rows(matrix: np.ndarray) -> bytes:
    """One row per line, values separated by spaces, no newline after the last."""
    return "\n".join(" ".join(map(str, row)) for row in np.asarray(matrix, dtype=np.int64).tolist()).encode()


def hex_bytes_words(matrix: np.ndarray, m: int = ITA_M) -> bytes:
    """m x m tiles of an 8-bit matrix, rows in tile order, four bytes per 32-bit word
    (element 0 in the least significant byte), one 8-digit hex word per line."""
    return format_words(encode_words(tiles(matrix, m, m).reshape(-1), 8, 32), 32)


def pack_24bit_words(values) -> np.ndarray:
    """24-bit two's complement values as one little-endian bit stream cut into 32-bit
    words: four values fill three words (w0 = v0 | v1<<24, w1 = v1>>8 | v2<<16,
    w2 = v2>>16 | v3<<8, each v masked to 24 bits)."""
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    if v.size % 4:
        v = np.concatenate([v, np.zeros(4 - v.size % 4, np.int64)])
    v = (v & 0xFFFFFF).reshape(-1, 4)
    words = np.stack(
        [
            v[:, 0] | ((v[:, 1] & 0xFF) << 24),
            (v[:, 1] >> 8) | ((v[:, 2] & 0xFFFF) << 16),
            (v[:, 2] >> 16) | (v[:, 3] << 8),
        ],
        axis=1,
    )
    return words.reshape(-1).astype(np.uint64)


# --- one block ----------------------------------------------------------------------------


def _matrix(array: np.ndarray, rows: int, cols: int, what: str) -> np.ndarray:
    a = np.asarray(array)
    if a.size != rows * cols:
        raise GraphError(f"{what}: expected {rows} x {cols} values, got shape {list(a.shape)}")
    return a.reshape(rows, cols).astype(np.int64)


def block_files(graph, block, arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Every file of one block for one sample: relative path -> bytes."""
    S = int(np.asarray(arrays[block.q]).shape[0])
    E, P = block.E, block.P
    problems = ita_constraints(graph, block, S)
    if problems:
        raise GraphError(f"attention block {block.name!r} does not fit ITA: " + "; ".join(problems))
    const = lambda name, rows, cols: _matrix(graph.tensors[name].data, rows, cols, name)  # noqa: E731
    value = lambda name, rows, cols: _matrix(arrays[name], rows, cols, name)  # noqa: E731

    def bias(rec, length):
        return np.zeros(length, np.int64) if not rec.get("bias") else graph.tensors[rec["bias"]].data.reshape(-1).astype(np.int64)

    q, kv = value(block.q, S, E), value(block.kv, S, E)
    files: dict[str, bytes] = {}
    std = lambda name, data: files.__setitem__(f"standalone/{name}.txt", decimal_lines(data))  # noqa: E731
    std("Q", input_stream(q, P))
    std("K", input_stream(kv, P))
    std("V", weight_stream(kv, P))
    hwpe = {name: [] for name in ("mem", "Q", "K", "V", "QK", "A", "AV", "OW")}
    for h, head in enumerate(block.heads):
        wq = const(head["Q"]["weight"], E, P)
        wk = const(head["K"]["weight"], E, P)
        wv = const(head["V"]["weight"], E, P)
        wo = const(head["OW"]["weight"], P, E)
        bq, bk, bv, bo = bias(head["Q"], P), bias(head["K"], P), bias(head["V"], P), bias(head["OW"], E)
        qp, kp, vp = value(head["Q"]["out"], S, P), value(head["K"]["out"], S, P), value(head["V"]["out"], S, P)
        qk, soft = value(head["QK"]["out"], S, S), value(head["A"]["out"], S, S)
        av, ow = value(head["AV"]["out"], S, P), value(head["OW"]["out"], S, E)

        std(f"Wq_{h}", weight_stream(wq.T, S))
        std(f"Bq_{h}", output_stream(np.broadcast_to(bq, (S, P))))
        std(f"Qp_{h}", output_stream(qp))
        std(f"Wk_{h}", weight_stream(wk.T, S))
        std(f"Bk_{h}", output_stream(np.broadcast_to(bk, (S, P))))
        std(f"Kp_{h}", output_stream(kp))
        std(f"Wv_{h}", input_stream(wv.T, S))
        std(f"Bv_{h}", output_stream(np.broadcast_to(bv[:, None], (P, S))))
        std(f"Vp_{h}", output_stream(vp.T))
        std(f"Qp_in_{h}", input_stream(qp, S))
        std(f"Kp_in_{h}", weight_stream(kp, S))
        std(f"A_{h}", output_stream(qk))
        std(f"A_soft_{h}", soft)
        std(f"A_stream_soft_in_{h}", input_stream(qk, P))
        std(f"Vp_in_{h}", weight_stream(vp.T, S))
        std(f"O_soft_{h}", output_stream(av))
        std(f"O_soft_in_{h}", input_stream(av, E))
        std(f"Wo_{h}", weight_stream(wo.T, S))
        std(f"Bo_{h}", output_stream(np.broadcast_to(bo, (S, E))))
        std(f"Out_soft_{h}", output_stream(ow))

        hwpe["mem"] += [hex_bytes_words(q), hex_bytes_words(kv)]
        hwpe["mem"] += [hex_bytes_words(w.T) for w in (wq, wk, wv, wo)]
        hwpe["mem"] += [format_words(pack_24bit_words(b), 32) for b in (bq, bk, bv, bo)]
        for name, matrix in (("Q", qp), ("K", kp), ("V", vp.T), ("QK", qk), ("A", soft), ("AV", av), ("OW", ow)):
            hwpe[name].append(hex_bytes_words(matrix))
    if block.H == 1:
        files["standalone/A_soft_in.txt"] = decimal_rows(np.tile(value(block.heads[0]["A"]["out"], S, S), (ITA_M // ITA_N, 1)))
    for name, parts in hwpe.items():
        files[f"hwpe/{name}.txt"] = b"".join(parts)
    for name, field_name in (("RQS_MUL", "mul"), ("RQS_SHIFT", "shift"), ("RQS_ADD", "add")):
        files[f"{name}.txt"] = decimal_rows(block.requant_table(field_name))
    return files


def write(ctx) -> None:
    folder = FileNames()
    for record in attention_records(ctx.graph):
        block = read_block(ctx.graph, record)
        for relpath, data in block_files(ctx.graph, block, ctx.sample.arrays).items():
            ctx.emit(f"ita/{folder(block.name)}/{relpath}", data)
