"""ITA: the attention-block graph form and the PyITA file layout, from hand-worked cases."""

import numpy as np
import pytest
from golden_helpers import ita_model, random_attention
from refsim import GraphBuilder
from refsim.blocks.ita import add_attention_block, read_block
from refsim.errors import GraphError, RefsimError
from refsim.golden.vectorset import write_vector_set
from refsim.hw_vectors import targets
from refsim.hw_vectors.ita import (
    decimal_lines,
    decimal_rows,
    hex_bytes_words,
    input_stream,
    output_stream,
    pack_24bit_words,
    weight_stream,
)
from refsim.inputs import Sample

# --- the four streams, on tiles small enough to work out by hand (m = 2 or 4, n = 1 or 2) ---

A = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])  # tiles of 2x2: T(0,0) = [[1,2],[5,6]], T(0,1) = [[3,4],[7,8]]


def test_input_stream_repeats_tile_rows_m_over_n_times_per_output_column_tile():
    # R = 2, K = 4, N = 4 output columns -> 2 column tiles; m // n = 2 repetitions of each tile.
    one_column_tile = [[1, 2], [5, 6], [1, 2], [5, 6], [3, 4], [7, 8], [3, 4], [7, 8]]
    assert input_stream(A, 4, m=2, n=1).tolist() == one_column_tile * 2


def test_weight_stream_repeats_the_whole_tiled_matrix_once_per_output_row_tile():
    bt = np.arange(8).reshape(2, 4)  # N = 2, K = 4: tiles [[0,1],[4,5]] and [[2,3],[6,7]]
    assert weight_stream(bt, 4, m=2).tolist() == [[0, 1], [4, 5], [2, 3], [6, 7]] * 2


def test_output_stream_walks_m_by_n_tiles():
    out = np.arange(16).reshape(4, 4)
    assert output_stream(out, m=2, n=1).reshape(-1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert output_stream(out[:2], m=2, n=2).tolist() == [[0, 1], [4, 5], [2, 3], [6, 7]]


def test_text_formats_have_no_final_newline():
    assert decimal_lines(np.array([[1, -2], [3, 4]])) == b"1\n-2\n3\n4"
    assert decimal_rows(np.array([[1, -2], [3, 4]])) == b"1 -2\n3 4"


def test_24_bit_biases_pack_four_into_three_words():
    # 1, -1, 0x123456, -0x800000 as 24-bit fields: 000001 ffffff 123456 800000.
    words = pack_24bit_words([1, -1, 0x123456, -0x800000])
    assert [f"{w:08x}" for w in words.tolist()] == ["ff000001", "3456ffff", "80000012"]


def test_hex_image_puts_four_bytes_per_word_lowest_first_in_tile_order():
    matrix = np.arange(32).reshape(4, 8) - 16  # 4x4 tiles: rows of tile (0,0) first, then tile (0,1)
    lines = hex_bytes_words(matrix, m=4).decode().split("\n")
    assert lines[:5] == ["f3f2f1f0", "fbfaf9f8", "03020100", "0b0a0908", "f7f6f5f4"]
    assert len(lines) == 8 + 1 and lines[-1] == ""  # every word line ends in a newline


# --- whole blocks ---------------------------------------------------------------------


def feeds(S, E, seed=1):
    rng = np.random.default_rng(seed)
    return {"q": rng.integers(-128, 128, (S, E)).astype(np.int8), "kv": rng.integers(-128, 128, (S, E)).astype(np.int8)}


def requant(x, mul, shift, add):
    """PyITA's requantize: floor(x*mul/2^shift + add + 1/2) clipped to int8, on Python ints."""
    return np.clip(((x * mul + (1 << (shift - 1))) >> shift) + add, -128, 127) if shift else np.clip(x * mul + add, -128, 127)


def clip26(x):
    return np.clip(x, -(1 << 25), (1 << 25) - 1)


def test_block_computes_pyita_steps(tmp_path):
    S, E, P, H = 64, 128, 64, 2
    model = ita_model(S, E, P, H, seed=5, cross=True)
    params = random_attention(np.random.default_rng(5), E, P, H)
    f = feeds(S, E)
    traced = {}
    out = model.run(f, trace=lambda node, name, a: traced.__setitem__(name, a))
    q, kv = f["q"].astype(np.int64), f["kv"].astype(np.int64)
    heads = []
    for h, p in enumerate(params.heads):
        pre = f"enc0.attn.h{h}"
        rq = lambda x, r: requant(x, r.mul, r.shift, r.add)  # noqa: E731
        Qp = rq(clip26(q @ p.wq + p.bq), p.q)
        Kp = rq(clip26(kv @ p.wk + p.bk), p.k)
        Vp = rq(clip26(kv @ p.wv + p.bv), p.v)
        QK = rq(clip26(Qp @ Kp.T), p.qk)
        for name, value in (("Q", Qp), ("K", Kp), ("V", Vp), ("QK", QK)):
            assert traced[f"{pre}.{name}"].tolist() == value.tolist(), name
        soft = traced[f"{pre}.A"].astype(np.int64)  # the softmax op has its own tests
        AV = rq(clip26(soft @ Vp), p.av)
        OW = rq(clip26(AV @ p.wo + p.bo), p.ow)
        assert traced[f"{pre}.AV"].tolist() == AV.tolist() and traced[f"{pre}.OW"].tolist() == OW.tolist()
        heads.append(OW)
    total = np.sum(heads, axis=0)
    expected = requant(total, params.sum.mul, params.sum.shift, params.sum.add)
    assert out["enc0.attn.out"].tolist() == expected.tolist()
    assert np.unique(expected).size > 20  # the random parameters keep values inside int8, not all clipped


@pytest.fixture(scope="module")
def ita_set(tmp_path_factory):
    S, E, P, H = 128, 64, 64, 2
    model = ita_model(S, E, P, H, seed=7, cross=True)
    f = feeds(S, E, seed=2)
    traced = {}
    model.run(f, trace=lambda node, name, a: traced.__setitem__(name, a))
    out = tmp_path_factory.mktemp("ita") / "set"
    write_vector_set(model, [Sample(f, "s")], out, targets("ita"))
    return out / "sample0000" / "ita" / "enc0.attn", model, f, traced


def values(path):
    return np.array([int(v) for v in path.read_text().split()], np.int64)


def test_standalone_streams_follow_the_tiling(ita_set):
    folder, model, f, traced = ita_set
    std = folder / "standalone"
    q = f["q"].astype(np.int64)
    Q = values(std / "Q.txt")
    assert Q.size == 128 * 64 * 4  # S*E values, each 64x64 tile sent 4 times, P/64 = 1 column tile
    # Value of row tile i, repetition rep, row r, column c: Q[64*i + r, c].
    for i, rep, r, c in [(0, 0, 0, 0), (0, 3, 63, 63), (1, 2, 5, 17), (1, 0, 10, 40)]:
        assert Q[i * 4 * 4096 + rep * 4096 + r * 64 + c] == q[64 * i + r, c]
    Qp = traced["enc0.attn.h1.Q"].astype(np.int64)
    out = values(std / "Qp_1.txt")
    # 64x16 tiles: row tile i, column group g, row r, lane l -> Qp[64*i + r, 16*g + l].
    for i, g, r, lane in [(0, 0, 0, 0), (1, 3, 63, 15), (0, 2, 7, 9)]:
        assert out[(i * 4 + g) * 1024 + r * 16 + lane] == Qp[64 * i + r, 16 * g + lane]
    bq = model.graph.tensors["enc0.attn.h0.Bq"].data.astype(np.int64)
    bias = values(std / "Bq_0.txt")
    assert bias.size == 128 * 64 and bias[(1 * 4 + 2) * 1024 + 33 * 16 + 5] == bq[2 * 16 + 5]
    # Vp is computed transposed: Vp_h holds Vp^T [P, S] in 64x16 tiles.
    Vp = traced["enc0.attn.h0.V"].astype(np.int64)
    assert values(std / "Vp_0.txt")[(0 * 8 + 5) * 1024 + 9 * 16 + 3] == Vp[5 * 16 + 3, 9]
    # The AV step streams A before the softmax; A_soft_h is the softmax output, row-major.
    A = traced["enc0.attn.h0.QK"].astype(np.int64)
    stream = values(std / "A_stream_soft_in_0.txt")
    # Row tile i, output column tile y (P/64 = 1), inner tile j (S/64 = 2), repetition, row, column.
    i, y, j, rep, r, c = 1, 0, 1, 2, 7, 8
    assert stream.size == 128 * 128 * 4
    assert stream[((i * 1 + y) * 2 + j) * 4 * 4096 + rep * 4096 + r * 64 + c] == A[64 * i + r, 64 * j + c]
    assert values(std / "A_soft_1.txt").tolist() == traced["enc0.attn.h1.A"].reshape(-1).tolist()
    assert not (std / "A_soft_in.txt").exists()  # PyITA writes it for one head only
    assert (std / "Q.txt").read_text()[-1] != "\n"


def test_requant_parameter_files(ita_set):
    folder, model, f, traced = ita_set
    params = random_attention(np.random.default_rng(7), 64, 64, 2)
    for fname, field in (("RQS_ATTN_MUL", "mul"), ("RQS_ATTN_SHIFT", "shift"), ("RQS_ATTN_ADD", "add")):
        rows = [[int(v) for v in line.split()] for line in (folder / f"{fname}.txt").read_text().split("\n")]
        expected = [[getattr(getattr(head, s), field) for s in ("q", "k", "v", "qk", "av", "ow")] + [getattr(params.sum, field)]
                    for head in params.heads]
        assert rows == expected


def test_hwpe_memory_image(ita_set):
    folder, model, f, traced = ita_set
    S, E, P = 128, 64, 64
    mem = (folder / "hwpe" / "mem.txt").read_text().splitlines()
    per_head = (2 * S * E + 4 * E * P) // 4 + 3 * (3 * P // 4) + 3 * E // 4
    assert len(mem) == 2 * per_head and all(len(w) == 8 for w in mem)
    q = f["q"]
    assert mem[0] == "".join(f"{int(v) & 0xFF:02x}" for v in q[0, 3::-1])  # Q[0, 0..3], element 0 lowest
    assert mem[16] == "".join(f"{int(v) & 0xFF:02x}" for v in q[1, 3::-1])  # next tile row: 64 bytes = 16 words later
    assert mem[per_head] == mem[0]  # each head's image starts with Q again
    bq = model.graph.tensors["enc0.attn.h0.Bq"].data.astype(np.int64)
    first_bias_word = (2 * S * E + 4 * E * P) // 4
    assert int(mem[first_bias_word], 16) == (int(bq[0]) & 0xFFFFFF) | ((int(bq[1]) & 0xFF) << 24)
    a = (folder / "hwpe" / "A.txt").read_text().splitlines()
    soft = traced["enc0.attn.h0.A"]
    assert len(a) == 2 * S * S // 4 and a[1] == "".join(f"{int(v):02x}" for v in soft[0, 7:3:-1])


def test_one_head_also_writes_a_soft_in(tmp_path):
    model = ita_model(64, 64, 64, 1, seed=3)
    write_vector_set(model, [Sample({"q": feeds(64, 64)["q"]}, "s")], tmp_path / "set", targets("ita"))
    std = tmp_path / "set" / "sample0000" / "ita" / "enc0.attn" / "standalone"
    rows = (std / "A_soft_in.txt").read_text().split("\n")
    assert len(rows) == 4 * 64 and rows[64] == rows[0] and len(rows[0].split()) == 64
    assert (std / "K.txt").read_text() == (std / "Q.txt").read_text()  # self-attention: q and kv are one tensor


def test_a_block_that_does_not_fit_lists_every_violation(tmp_path):
    rng = np.random.default_rng(0)
    params = random_attention(rng, 96, 64, 1)
    params.heads[0].bq[3] = 1 << 23
    b = GraphBuilder("too_wide")
    q = b.input("q", "int8", [80, 96])
    b.output(add_attention_block(b, "blk", q, q, params).out)
    model = b.model()
    with pytest.raises(GraphError) as e:
        write_vector_set(model, [Sample({"q": np.zeros((80, 96), np.int8)}, "s")], tmp_path / "set", targets("ita"))
    message = str(e.value)
    for part in ("sequence length S = 80 is not a positive multiple of 64", "embedding size E = 96",
                 "'blk.h0.Bq' spans", "beyond 24-bit signed"):
        assert part in message
    assert "\n" not in message and list(tmp_path.iterdir()) == []


def test_graph_form_deviations_are_named(tmp_path):
    model = ita_model(64, 64, 64, 1)
    record = model.graph.metadata["attention_blocks"][0]
    node = next(n for n in model.graph.nodes if n.name == "enc0.attn.h0.K_acc")
    node.attrs["acc_bits"] = 32
    with pytest.raises(GraphError, match="enc0.attn.h0.K_acc.*26 bits with overflow=saturate"):
        read_block(model.graph, record)
    node.attrs["acc_bits"] = 26
    bad = dict(record, heads=[dict(record["heads"][0], QK=dict(record["heads"][0]["QK"], out="enc0.attn.h0.V"))])
    with pytest.raises(GraphError, match="must be produced by Requant|must multiply|must take"):
        read_block(model.graph, bad)


def test_a_model_without_blocks_is_refused(tmp_path):
    b = GraphBuilder("plain")
    b.output(b.node("Relu", [b.input("x", "int8", [4])], outputs="y"))
    with pytest.raises(RefsimError, match="records no ITA attention or feed-forward blocks"):
        write_vector_set(b.model(), [Sample({"x": np.zeros(4, np.int8)}, "s")], tmp_path / "set", targets("ita"))


def test_cli_writes_ita_files_for_a_saved_model(tmp_path, capsys):
    from refsim.cli import main as cli
    from refsim.intq import save

    model = ita_model(64, 64, 64, 2, seed=11)
    save(model.graph, tmp_path / "block.intq")  # the record survives the file format
    np.save(tmp_path / "q.npy", feeds(64, 64)["q"])
    out = tmp_path / "vectors"
    args = ["golden", str(tmp_path / "block.intq"), str(tmp_path / "q.npy"), "-o", str(out), "--targets", "ita,memh"]
    assert cli(args) == 0
    folder = out / "sample0000" / "ita" / "enc0.attn"
    assert (folder / "hwpe" / "mem.txt").is_file() and (folder / "standalone" / "Out_soft_1.txt").is_file()
    assert cli(["check", str(out), str(out), "--tensors", "enc0.attn.h1.*"]) == 0
    assert "0 mismatch, 0 missing: OK" in capsys.readouterr().out


# --- the feed-forward block -----------------------------------------------------------------


def ff_model(activation="gelu", S=64, E=64, F=128, attention=None, seed=4):
    from refsim.blocks.ita import ItaFeedForward, ItaGeluConstants, ItaRequant, add_feedforward_block

    rng = np.random.default_rng(seed)
    b = GraphBuilder("ffn")
    x = b.input("x", "int8", [S, E])
    params = ItaFeedForward(
        w1=rng.integers(-128, 128, (E, F)), w2=rng.integers(-128, 128, (F, E)),
        b1=rng.integers(-(1 << 12), 1 << 12, F), b2=rng.integers(-(1 << 12), 1 << 12, E),
        f1=ItaRequant(90, 17), f2=ItaRequant(80, 18, 3), activation=activation,
        act=ItaRequant(100, 7, -2) if activation == "relu" else ItaRequant(74, 20) if activation == "gelu" else None,
        gelu=ItaGeluConstants(-7091, -80, -7091) if activation == "gelu" else None, attention=attention)
    b.output(add_feedforward_block(b, "ffn", x, params).out)
    return b.model(), params


@pytest.mark.parametrize("activation", ["identity", "relu", "gelu"])
def test_feedforward_block_computes_pyita_steps(activation):
    from refsim.ops.gelu import ITAGelu

    model, p = ff_model(activation)
    x = np.random.default_rng(9).integers(-128, 128, (64, 64)).astype(np.int8)
    traced = {}
    out = model.run({"x": x}, trace=lambda node, name, a: traced.__setitem__(name, a))
    rq = lambda v, r: requant(v, r.mul, r.shift, r.add)  # noqa: E731
    f1 = rq(clip26(x.astype(np.int64) @ p.w1 + p.b1), p.f1)
    if activation == "relu":
        act = rq(np.maximum(f1, 0), p.act)
    elif activation == "gelu":  # the op has its own tests against PyITA's formula
        act = ITAGelu(f1.astype(np.int8), q_1=-7091, q_b=-80, q_c=-7091, eps_mul=74, eps_shift=20).astype(np.int64)
    else:
        act = f1
    assert traced["ffn.F1"].tolist() == f1.tolist()
    assert out["ffn.F2"].tolist() == rq(clip26(act @ p.w2 + p.b2), p.f2).tolist()
    assert np.unique(out["ffn.F2"]).size > 10


def test_an_unpaired_feedforward_block_gets_its_own_folder(tmp_path):
    model, _ = ff_model("relu")
    x = np.zeros((64, 64), np.int8)
    write_vector_set(model, [Sample({"x": x}, "s")], tmp_path / "set", targets("ita"))
    folder = tmp_path / "set" / "sample0000" / "ita" / "ffn"
    assert (folder / "standalone" / "FF2p_0.txt").is_file() and not (folder / "standalone" / "Q.txt").exists()
    assert (folder / "RQS_FFN_MUL.txt").read_text() == "90 80" and (folder / "activation_requant_add.txt").read_text() == "-2"
    assert len((folder / "hwpe" / "mem.txt").read_text().splitlines()) == (64 * 64 + 2 * 64 * 128) // 4 + 3 * (128 + 64) // 4


def test_feedforward_blocks_that_do_not_fit_or_deviate_are_named(tmp_path):
    from refsim.blocks.ita import read_feedforward_block

    model, _ = ff_model("gelu", F=96, attention="nowhere")
    with pytest.raises(GraphError, match="pairs with attention block 'nowhere'"):
        write_vector_set(model, [Sample({"x": np.zeros((64, 64), np.int8)}, "s")], tmp_path / "a", targets("ita"))
    model, _ = ff_model("gelu", F=96)
    with pytest.raises(GraphError, match="feed-forward size F = 96 is not a positive multiple of 64"):
        write_vector_set(model, [Sample({"x": np.zeros((64, 64), np.int8)}, "s")], tmp_path / "b", targets("ita"))
    model, _ = ff_model("gelu")
    node = next(n for n in model.graph.nodes if n.name == "ffn.act")
    node.attrs["q_1"] = 5
    with pytest.raises(GraphError, match="q_1 = 5 differs from q_c = -7091"):
        write_vector_set(model, [Sample({"x": np.zeros((64, 64), np.int8)}, "s")], tmp_path / "c", targets("ita"))
    record = model.graph.metadata["feedforward_blocks"][0]
    with pytest.raises(GraphError, match="ffn.F2_acc.*must multiply 'ffn.F1'"):
        read_feedforward_block(model.graph, dict(record, activation=dict(record["activation"], op="identity", out="ffn.F1")))
