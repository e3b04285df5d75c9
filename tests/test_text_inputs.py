"""refsim.text (embedded tokenizers)."""

from __future__ import annotations

import export_helpers as h
import numpy as np
import pytest
from refsim import GraphBuilder
from refsim.cli import main as cli
from refsim.engine import Model
from refsim.errors import InputError, RefsimError
from refsim.text import TextEncoder, encoder_for, text_reader_for

pytest.importorskip("tokenizers")


def test_encoder_pads_and_truncates_to_max_length():
    enc = TextEncoder(h.tokenizer_json(), max_length=6)
    out = enc.encode(["the cat", "the cat and the dog runs in the garden"])
    ids, mask = out["ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (2, 6) and ids.dtype == np.int64
    # [CLS] the cat [SEP] [PAD] [PAD]: ids 2, the, cat, 3, 0, 0
    assert ids[0, 0] == 2 and ids[0, 3] == 3 and ids[0, 4:].tolist() == [0, 0]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert ids[1, -1] == 3  # truncation keeps the closing [SEP]
    assert enc.settings() == {"max_length": 6, "padding": "max_length", "truncation": True, "pad_id": 0}


def test_bad_tokenizer_json_is_a_refsim_error():
    with pytest.raises(RefsimError, match="not a valid tokenizers JSON"):
        TextEncoder(b"{}", 8)


def _text_model(max_length=8) -> Model:
    b = GraphBuilder("echo")
    ids = b.input("input_ids", "int32", ["batch", max_length])
    mask = b.input("attention_mask", "uint8", ["batch", max_length])
    b.output(b.node("Add", [ids, mask], outputs="sum"))
    b.metadata["tokenizer"] = {"blob": "tokenizer.json", "max_length": max_length, "truncation": True, "pad_id": 0,
                               "inputs": {"input_ids": "ids", "attention_mask": "attention_mask"}}
    b.blobs["tokenizer.json"] = h.tokenizer_json().encode()
    return b.model()


def test_text_reader_feeds_the_declared_types():
    model = _text_model()
    samples = list(text_reader_for(model)("lines.txt", ["the dog", "", "# comment", "a red car"]))
    assert [s.source for s in samples] == ["lines.txt:1", "lines.txt:4"]
    assert samples[0].text == "the dog"
    assert samples[0].feeds["input_ids"].dtype == np.int32 and samples[0].feeds["attention_mask"].dtype == np.uint8
    assert samples[0].feeds["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]


def test_refsim_run_reads_text_lines(tmp_path, capsys):
    from refsim.intq import save

    model = _text_model()
    save(model.graph, tmp_path / "echo.intq")
    (tmp_path / "in.txt").write_text("the cat\n")
    assert cli(["run", str(tmp_path / "echo.intq"), str(tmp_path / "in.txt")]) == 0
    out = capsys.readouterr().out
    assert "the cat" in out and "sum int64[1, 8]" in out


def test_encoder_for_without_tokenizer():
    b = GraphBuilder("plain")
    b.output(b.input("x", "int8", [1, 2]))
    with pytest.raises(InputError, match="no embedded tokenizer"):
        encoder_for(b.model())
