"""Graph forms users produce, through `refsim export`: `scaled_dot_product_attention` as the
dynamo exporter writes it (with and without a boolean mask), attention without a head split
(`q @ k.transpose(-1, -2)` on [batch, seq, width], which gets ITA's block record), boolean
mask inputs, and the one-line errors for models refsim cannot take."""

from __future__ import annotations

import math
import warnings

import export_helpers as h
import numpy as np
import pytest
import refsim
from refsim.cli import main as cli
from refsim.exporters import compare, export
from refsim.exporters.dyadic import ExportError

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
WIDTH, SEQ = 32, 16


class Attention(torch.nn.Module):
    """One encoder block: attention (SDPA with heads, or a single head written out), LayerNorm."""

    def __init__(self, heads: int, sdpa: bool, width: int = WIDTH):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.sdpa = heads, sdpa
        self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x, attention_mask=None):
        b, s, e = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.sdpa:
            split = lambda t: t.view(b, s, self.heads, e // self.heads).transpose(1, 2)  # noqa: E731
            mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
            y = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
            y = y.transpose(1, 2).reshape(b, s, e)
        else:
            y = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e), dim=-1) @ v
        h_ = self.norm(x + self.o(y))
        return self.head(h_[:, 0])


def export_module(module, path, dynamo, masked, fixed, seq=SEQ, width=WIDTH):
    batch = 1 if fixed else 2
    x = torch.randn(batch, seq, width)
    args = (x, torch.ones(batch, seq, dtype=torch.long)) if masked else (x,)
    names = ["x", "attention_mask"][:len(args)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = dict(input_names=names, output_names=["logits"], verbose=False)
        if dynamo:
            if not fixed:
                kwargs["dynamic_shapes"] = tuple({0: torch.export.Dim.AUTO} for _ in names)
            torch.onnx.export(module.eval(), args, path, dynamo=True, external_data=False, **kwargs)
        else:
            if not fixed:
                kwargs["dynamic_axes"] = {n: {0: "batch"} for n in names}
            torch.onnx.export(module.eval(), args, path, dynamo=False, opset_version=17, **kwargs)
    return str(path)


def data(path, seed, masked, seq=SEQ, width=WIDTH):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((12, seq, width)).astype(np.float32)
    if not masked:
        np.save(path.with_suffix(".npy"), x)
        return str(path.with_suffix(".npy"))
    mask = (np.arange(seq)[None] < rng.integers(4, seq + 1, (12, 1))).astype(np.int64)
    np.savez(path.with_suffix(".npz"), x=x, attention_mask=mask)
    return str(path.with_suffix(".npz"))


def agrees(model, out, evaluation):
    pair = compare(model, out, evaluation).outputs["logits"]["integer vs fake-quant"]
    assert pair["cosine"] >= 0.999 and pair["top1_agreement"] == 1.0, pair


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "dynamic"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_sdpa_as_dynamo_writes_it(tmp_path, masked, fixed):
    model = export_module(Attention(4, sdpa=True), tmp_path / "sdpa.onnx", True, masked, fixed)
    calib, evaluation = data(tmp_path / "calib", 1, masked), data(tmp_path / "eval", 2, masked)
    for mode in ("ibert", "ita"):
        out = tmp_path / f"sdpa_{mode}.intq"
        export(model, out, calib, mode=mode)
        m = refsim.load(out)
        if mode == "ita":
            # Unmasked attention takes ITA's attention-block form; masked attention ITAMax with the mask.
            assert bool(m.metadata.get("attention_blocks")) is not masked
        agrees(model, out, evaluation)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_attention_without_head_split_gets_the_ita_block_record(tmp_path, dynamo, capsys):
    from refsim.blocks.ita import attention_records, read_block

    # ITA's sizes: S, E and P multiples of 64.
    size = dict(seq=64, width=64)
    model = export_module(Attention(1, sdpa=False, width=64), tmp_path / "single.onnx", dynamo, False, True, **size)
    calib, evaluation = data(tmp_path / "calib", 1, False, **size), data(tmp_path / "eval", 2, False, **size)
    out = tmp_path / "single.intq"
    export(model, out, calib, mode="ita")
    m = refsim.load(out)
    (record,) = attention_records(m.graph)
    assert record["H"] == 1 and record["P"] == 64
    read_block(m.graph, record)  # raises on any deviation from docs/ITA.md
    agrees(model, out, evaluation)
    np.save(tmp_path / "one.npy", np.load(evaluation)[:1])
    assert cli(["golden", str(out), str(tmp_path / "one.npy"), "-o", str(tmp_path / "vectors"), "--targets", "ita"]) == 0


def test_boolean_mask_inputs(tmp_path):
    """A BERT exported with a boolean attention_mask input (HF accepts either)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(h.VOCAB_WORDS) + 4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    bert = BertForSequenceClassification(cfg).eval()
    h._perturb(bert, torch)
    ids = torch.ones(1, h.SEQ, dtype=torch.long)
    path = tmp_path / "bert_bool.onnx"
    h.export_onnx(bert, (ids, torch.ones(1, h.SEQ, dtype=torch.bool)), path, ("input_ids", "attention_mask"), True, None)
    tok = tmp_path / "tokenizer.json"
    tok.write_text(h.tokenizer_json())
    calib, evaluation = h.text_data(tmp_path / "c.txt", 16, 1), h.text_data(tmp_path / "e.txt", 12, 2)
    out = tmp_path / "bert_bool.intq"
    export(str(path), out, calib, tokenizer=str(tok))
    assert refsim.load(out).metadata["source_model"]  # exported
    agrees(str(path), out, evaluation)


def test_errors_are_one_line(tmp_path, capsys):
    bert = h.bert(tmp_path / "bert.onnx", dynamo=False)
    tok = tmp_path / "tokenizer.json"
    tok.write_text(h.tokenizer_json())
    calib = h.text_data(tmp_path / "c.txt", 8, 1)
    # A sequence longer than the model's position embeddings (64): the default length 128.
    assert cli(["export", bert, "-o", str(tmp_path / "x.intq"), "--calib", calib, "--tokenizer", str(tok), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-length" in err and "input_ids" in err
    with pytest.raises(ExportError, match="open dimension 1 .*--max-length"):
        from refsim.exporters.frontend.passes import canonicalize

        canonicalize(bert)
    assert not (tmp_path / "x.intq").exists()
