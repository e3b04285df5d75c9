"""Target `ita`: the files ITA's testbenches read, laid out as PyITA writes them.

The contract is ITA main's testbench (pulp-platform/ITA `src/tb/ita_tb.sv`, which reads
`RQS_ATTN_*` and `RQS_FFN_*`; PyITA/ITA.py as of commit b18f1d8 writes them): seven phases,
Q, K, V, QK with AV, OW of one attention block, then FF1 (with its activation) and FF2 of one
feed-forward block, all from one folder. For every such folder (an attention block with the
feed-forward block recorded as its partner, or an unpaired block alone; docs/ITA.md) and
every sample, `ita/<block>/` gets

    standalone/   decimal tile streams, one value per line, for ita_tb.sv
    hwpe/         32-bit hex memory image (mem.txt) and expected outputs, for ita_hwpe_tb.sv
    RQS_ATTN_MUL.txt, RQS_ATTN_SHIFT.txt, RQS_ATTN_ADD.txt   attention requantization, one row per head
    RQS_FFN_MUL.txt, RQS_FFN_SHIFT.txt, RQS_FFN_ADD.txt      FF1 and FF2 requantization, one row
    GELU_ONE.txt, GELU_B.txt, GELU_C.txt, activation_requant_{mult,shift,add}.txt

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

    FF1 out act[S,F]  = FF[S,E] . Wff        input FF       weight Wff_0     bias Bff_0  output FFp_0
    FF2 out[S,E]      = act . Wff2           input FFp_in_0 weight Wff2_0    bias Bff2_0 output FF2p_0

plus A_soft_h, the softmax output [S, S] row-major, and (one head only) A_soft_in, that
matrix four times over, one row per line. FFp_0 is FF1's output after the activation
(identity, ReLU then the activation requantizer, or ITA's i-GELU with it), as in PyITA. Files have no newline after the last value, as
PyITA writes them. The V step computes Vp transposed, so its bias stream is Bv broadcast
along rows of [P, S].

Where PyITA fails, refsim does the evident thing and says so in docs/GOLDEN.md: PyITA's
standalone bias files raise for more than one head; refsim writes each head's bias as the
one-head layout would.
"""

from __future__ import annotations

import numpy as np
from refsim.blocks.ita import (
    ITA_TILE,
    ItaFeedForwardBlock,
    attention_records,
    feedforward_constraints,
    feedforward_records,
    ita_constraints,
    read_block,
    read_feedforward_block,
)
from refsim.errors import GraphError
from refsim.golden.memh import encode_words, format_words
from refsim.golden.names import FileNames

ITA_M = ITA_TILE
ITA_N = 16
NEEDS_ALL_TENSORS = True


def describe(options) -> dict:
    return {
        "layout": "ITA main's ita_tb.sv contract: PyITA standalone/ decimal tile streams, hwpe/ 32-bit hex memory "
                  "image, RQS_ATTN_*/RQS_FFN_*/GELU/activation files, per attention block and its feed-forward block",
        "tile": [ITA_M, ITA_N],
    }


def units(graph) -> list[tuple[str, object | None, object | None]]:
    """The testbench folders: (folder block name, attention block, feed-forward block).

    ITA's testbench runs one attention block and then one feed-forward block from one folder;
    a feed-forward block recorded with `attention` = NAME shares NAME's folder."""
    attention = [read_block(graph, r) for r in attention_records(graph)]
    feedforward = [read_feedforward_block(graph, r) for r in feedforward_records(graph)]
    names = {a.name for a in attention}
    paired: dict[str, object] = {}
    for ff in feedforward:
        if ff.attention is not None and ff.attention not in names:
            raise GraphError(f"feed-forward block {ff.name!r}: pairs with attention block {ff.attention!r}, which is not recorded")
        if ff.attention in paired:
            raise GraphError(f"attention block {ff.attention!r}: two feed-forward blocks pair with it ({paired[ff.attention].name!r}, {ff.name!r})")
        if ff.attention is not None:
            paired[ff.attention] = ff
    out = [(a.name, a, paired.get(a.name)) for a in attention]
    out += [(ff.name, None, ff) for ff in feedforward if ff.attention is None]
    return out


def _constraints(graph, blocks, arrays=None) -> None:
    """Refuse a block that does not fit ITA, with its sequence length from the sample's
    arrays (or the declared shape, when it is fixed, before anything runs)."""
    for block in blocks:
        if block is None:
            continue
        is_ff = isinstance(block, ItaFeedForwardBlock)
        x = block.x if is_ff else block.q
        S = np.asarray(arrays[x]).shape[0] if arrays is not None else graph.tensors[x].shape[0]
        problems = (feedforward_constraints if is_ff else ita_constraints)(graph, block, S if isinstance(S, int) else None)
        if problems:
            kind = "feed-forward" if is_ff else "attention"
            raise GraphError(f"{kind} block {block.name!r} does not fit ITA: " + "; ".join(problems))


def check(graph, options) -> None:
    found = units(graph)
    if not found:
        raise GraphError(
            "target ita: the model records no ITA attention or feed-forward blocks (metadata attention_blocks, "
            "feedforward_blocks); export it with `refsim export --mode ita` or build blocks with refsim.blocks.ita"
        )
    for _, attention, feedforward in found:
        _constraints(graph, (attention, feedforward))


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


def _bias(graph, step, length) -> np.ndarray:
    if not step.get("bias"):
        return np.zeros(length, np.int64)
    return graph.tensors[step["bias"]].data.reshape(-1).astype(np.int64)


def _const(graph, name, rows, cols) -> np.ndarray:
    return _matrix(graph.tensors[name].data, rows, cols, name)


def attention_files(graph, block, arrays: dict[str, np.ndarray], files: dict[str, bytes], mem: list[bytes]) -> None:
    """The attention phases' files of one block for one sample (relative path -> bytes);
    the memory image's attention part is appended to `mem`."""
    S = int(np.asarray(arrays[block.q]).shape[0])
    E, P = block.E, block.P
    value = lambda name, rows, cols: _matrix(arrays[name], rows, cols, name)  # noqa: E731
    q, kv = value(block.q, S, E), value(block.kv, S, E)
    std = lambda name, data: files.__setitem__(f"standalone/{name}.txt", decimal_lines(data))  # noqa: E731
    std("Q", input_stream(q, P))
    std("K", input_stream(kv, P))
    std("V", weight_stream(kv, P))
    hwpe = {name: [] for name in ("Q", "K", "V", "QK", "A", "AV", "OW")}
    for h, head in enumerate(block.heads):
        wq = _const(graph, head["Q"]["weight"], E, P)
        wk = _const(graph, head["K"]["weight"], E, P)
        wv = _const(graph, head["V"]["weight"], E, P)
        wo = _const(graph, head["OW"]["weight"], P, E)
        bq, bk, bv, bo = (_bias(graph, head[s], n) for s, n in (("Q", P), ("K", P), ("V", P), ("OW", E)))
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

        mem += [hex_bytes_words(q), hex_bytes_words(kv)]
        mem += [hex_bytes_words(w.T) for w in (wq, wk, wv, wo)]
        mem += [format_words(pack_24bit_words(b), 32) for b in (bq, bk, bv, bo)]
        for name, matrix in (("Q", qp), ("K", kp), ("V", vp.T), ("QK", qk), ("A", soft), ("AV", av), ("OW", ow)):
            hwpe[name].append(hex_bytes_words(matrix))
    if block.H == 1:
        files["standalone/A_soft_in.txt"] = decimal_rows(np.tile(value(block.heads[0]["A"]["out"], S, S), (ITA_M // ITA_N, 1)))
    for name, parts in hwpe.items():
        files[f"hwpe/{name}.txt"] = b"".join(parts)
    for name, field_name in (("MUL", "mul"), ("SHIFT", "shift"), ("ADD", "add")):
        files[f"RQS_ATTN_{name}.txt"] = decimal_rows(block.requant_table(field_name))


def feedforward_files(graph, block, arrays: dict[str, np.ndarray], files: dict[str, bytes], mem: list[bytes]) -> None:
    """The feed-forward phases' files (FF1 with its activation, then FF2) of one block for
    one sample, as PyITA's feedforward_layer writes them; mem gets the memory image's part."""
    S = int(np.asarray(arrays[block.x]).shape[0])
    E, F = block.E, block.F
    value = lambda name, rows, cols: _matrix(arrays[name], rows, cols, name)  # noqa: E731
    f1, f2 = block.steps["F1"], block.steps["F2"]
    x = value(block.x, S, E)
    w1, w2 = _const(graph, f1["weight"], E, F), _const(graph, f2["weight"], F, E)
    b1, b2 = _bias(graph, f1, F), _bias(graph, f2, E)
    act, out = value(block.act_out, S, F), value(f2["out"], S, E)
    std = lambda name, data: files.__setitem__(f"standalone/{name}.txt", decimal_lines(data))  # noqa: E731
    # FF1 runs like the Q projection, FF2 like the output projection; FF1's output is the activation's.
    std("FF", input_stream(x, F))
    std("Wff_0", weight_stream(w1.T, S))
    std("Bff_0", output_stream(np.broadcast_to(b1, (S, F))))
    std("FFp_0", output_stream(act))
    std("FFp_in_0", input_stream(act, E))
    std("Wff2_0", weight_stream(w2.T, S))
    std("Bff2_0", output_stream(np.broadcast_to(b2, (S, E))))
    std("FF2p_0", output_stream(out))
    mem += [hex_bytes_words(x), hex_bytes_words(w1.T), hex_bytes_words(w2.T)]
    mem += [format_words(pack_24bit_words(b), 32) for b in (b1, b2)]
    files["hwpe/F1.txt"] = hex_bytes_words(act)
    files["hwpe/F2.txt"] = hex_bytes_words(out)
    rqs = [f1["requant"], f2["requant"]]
    for name, field_name in (("MUL", "mul"), ("SHIFT", "shift"), ("ADD", "add")):
        files[f"RQS_FFN_{name}.txt"] = decimal_rows([[getattr(rq, field_name) for rq in rqs]])
    # The testbench loads the GELU and activation constants whatever the activation; the
    # ones the activation does not use are written as 0 (PyITA writes its GELU defaults).
    gelu, rq = block.gelu, block.act_requant
    constants = {
        "GELU_ONE": gelu.q_1 if gelu else 0,
        "GELU_B": gelu.q_b if gelu else 0,
        "GELU_C": gelu.q_c if gelu else 0,
        "activation_requant_mult": rq.mul if rq else 0,
        "activation_requant_shift": rq.shift if rq else 0,
        "activation_requant_add": rq.add if rq else 0,
    }
    for name, v in constants.items():
        files[f"{name}.txt"] = str(int(v)).encode()


def unit_files(graph, attention, feedforward, arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Every file of one testbench folder for one sample: relative path -> bytes."""
    _constraints(graph, (attention, feedforward), arrays)
    files: dict[str, bytes] = {}
    mem: list[bytes] = []  # the memory image: attention heads first, then the feed-forward part
    if attention is not None:
        attention_files(graph, attention, arrays, files, mem)
    if feedforward is not None:
        feedforward_files(graph, feedforward, arrays, files, mem)
    files["hwpe/mem.txt"] = b"".join(mem)
    return files


def write(ctx) -> None:
    folder = FileNames()
    for name, attention, feedforward in units(ctx.graph):
        for relpath, data in unit_files(ctx.graph, attention, feedforward, ctx.sample.arrays).items():
            ctx.emit(f"ita/{folder(name)}/{relpath}", data)
