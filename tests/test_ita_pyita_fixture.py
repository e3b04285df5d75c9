"""The `ita` target against files PyITA itself wrote, file by file.

tests/data/pyita_S64_E64_P64_F128.tar.xz holds what PyITA's generator (pulp-platform/ITA,
PyITA/ITA.py as of commit b18f1d8, the version writing the RQS_ATTN_*/RQS_FFN_* files that
ITA main's src/tb/ita_tb.sv reads) wrote for one attention block and one feed-forward block,
S = 64, E = 64, P = 64, F = 128, one head, with biases, once per activation (identity, relu,
gelu), together with params.npz: the inputs, weights and requantization parameters it drew.
Only PyITA's output is stored here, never its code. refsim rebuilds the same blocks from
params.npz and must write the same bytes.
"""

import tarfile

import numpy as np
import pytest
from golden_helpers import ensure_ita_softmax
from refsim import GraphBuilder
from refsim.blocks.ita import (
    ItaAttention,
    ItaFeedForward,
    ItaGeluConstants,
    ItaHead,
    ItaRequant,
    ItaSoftmax,
    add_attention_block,
    add_feedforward_block,
)
from refsim.golden.vectorset import write_vector_set
from refsim.hw_vectors import targets
from refsim.inputs import Sample

FIXTURE = "tests/data/pyita_S64_E64_P64_F128.tar.xz"
ACTIVATIONS = ("identity", "relu", "gelu")
# The testbench reads these for every activation; an activation that does not use them gets 0
# from refsim, PyITA's own GELU defaults from PyITA. Everything else must be equal byte for byte.
UNUSED = {
    "identity": {"GELU_ONE.txt", "GELU_B.txt", "GELU_C.txt", "activation_requant_mult.txt",
                 "activation_requant_shift.txt", "activation_requant_add.txt"},
    "relu": {"GELU_ONE.txt", "GELU_B.txt", "GELU_C.txt"},
    "gelu": set(),
}


@pytest.fixture(scope="module")
def pyita(tmp_path_factory):
    root = tmp_path_factory.mktemp("pyita")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(root, filter="data")
    return root


def build(p, activation):
    ensure_ita_softmax()
    rq = lambda i: ItaRequant(int(p["rqs_mul"][i]), int(p["rqs_shift"][i]), int(p["rqs_add"][i]))  # noqa: E731
    ffn = lambda i: ItaRequant(int(p["ffn_mul"][i]), int(p["ffn_shift"][i]), int(p["ffn_add"][i]))  # noqa: E731
    head = ItaHead(wq=p["Wq"], wk=p["Wk"], wv=p["Wv"], wo=p["Wo"], bq=p["Bq"], bk=p["Bk"], bv=p["Bv"], bo=p["Bo"],
                   q=rq(0), k=rq(1), v=rq(2), qk=rq(3), av=rq(4), ow=rq(5))
    S, E = p["Q"].shape
    b = GraphBuilder("pyita_block")
    q, kv, x = b.input("Q", "int8", [S, E]), b.input("K", "int8", [S, E]), b.input("FF", "int8", [S, E])
    attn = add_attention_block(b, "attn", q, kv, ItaAttention([head], rq(6), ItaSoftmax("ITAPartialMax")))
    mul, shift, add = (int(v) for v in p["act_rqs"])
    ff = ItaFeedForward(w1=p["Wff"], w2=p["Wff2"], b1=p["Bff"], b2=p["Bff2"], f1=ffn(0), f2=ffn(1),
                        activation=activation, act=None if activation == "identity" else ItaRequant(mul, shift, add),
                        gelu=ItaGeluConstants(*(int(v) for v in p["gelu"])) if activation == "gelu" else None,
                        attention="attn")
    b.output(attn.out, add_feedforward_block(b, "ffn", x, ff).out)
    return b.model()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_refsim_writes_the_files_pyita_wrote(pyita, tmp_path, activation):
    theirs = pyita / f"data_S64_E64_P64_F128_H1_B1_{activation}"
    p = np.load(theirs / "params.npz", allow_pickle=False)
    model = build(p, activation)
    feeds = {"Q": p["Q"], "K": p["K"], "FF": p["FF"]}
    write_vector_set(model, [Sample(feeds, "pyita")], tmp_path / "set", targets("ita"))
    ours = tmp_path / "set" / "sample0000" / "ita" / "attn"
    their_files = sorted(str(f.relative_to(theirs)) for f in theirs.rglob("*.txt"))
    our_files = sorted(str(f.relative_to(ours)) for f in ours.rglob("*.txt"))
    assert our_files == their_files, set(our_files) ^ set(their_files)
    differ = [f for f in their_files if (ours / f).read_bytes() != (theirs / f).read_bytes()]
    assert len(their_files) == 54 and sorted(differ) == sorted(UNUSED[activation] & set(differ)), differ
    for f in UNUSED[activation]:
        assert (ours / f).read_text() == "0" and int((theirs / f).read_text()) is not None
    # The block output after the head sum is no file of PyITA's, but it is in params.npz.
    out = model.run(feeds)
    assert out["attn.out"].tolist() == p["out_sum"].tolist()
    # The comparison would see a wrong activation: its output varies (relu: PyITA's own
    # constants requantize ReLU's int8 output by 74 / 2^20, which is 0 everywhere, in the RTL too).
    f1 = np.array((theirs / "standalone" / "FFp_0.txt").read_text().split(), int)
    assert (np.unique(f1).size > 10) == (activation != "relu")
