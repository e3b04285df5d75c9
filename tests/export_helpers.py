"""Small random-initialised Hugging Face models exported to ONNX, for the exporter tests.

Every model is tiny (hidden size 32, 1-2 layers) so that exporting it with both of
torch.onnx.export's exporters and quantizing it takes a second or two. LayerNorm and bias
parameters are perturbed away from their initial 1/0 so that no pattern degenerates (a
zero bias or a unit NoNorm would be removed by canonicalization).
"""

from __future__ import annotations

import warnings

import numpy as np

SEQ = 16
VOCAB_WORDS = (
    "the a an and or of to in on at for with by from is was are were be been it this that "
    "cat dog bird fish tree river city road car train house garden book music film game "
    "red green blue small big old new happy sad fast slow good bad warm cold "
    "runs walks reads sings sleeps eats sees likes plays builds"
).split()


def tokenizer_json() -> str:
    """A WordLevel tokenizer over VOCAB_WORDS with BERT's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for word in VOCAB_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok.to_str()


def sentences(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = [w for w in VOCAB_WORDS]
    return [" ".join(rng.choice(words, int(rng.integers(3, SEQ - 3)))) for _ in range(count)]


def _perturb(model, torch) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if "classifier" in name and name.endswith("weight"):
                p.mul_(20)  # spread the logits so top-1 agreement means something


def export_onnx(model, args, path, names, dynamo: bool, dynamic: dict[str, dict[int, str]] | None) -> str:
    """torch.onnx.export with the dynamo or the TorchScript exporter; `dynamic` None: fixed
    shapes, exactly as a plain `torch.onnx.export(model, args, path)` writes them."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamic is None:
            kwargs = {} if dynamo else {"opset_version": 17}
            torch.onnx.export(model, args, path, dynamo=dynamo, input_names=list(names), output_names=["logits"],
                              verbose=False, **kwargs)
        elif dynamo:
            shapes = tuple({axis: torch.export.Dim.AUTO for axis in dynamic[n]} for n in names)
            torch.onnx.export(model, args, path, dynamo=True, input_names=list(names), output_names=["logits"],
                              dynamic_shapes=shapes, verbose=False)
        else:
            torch.onnx.export(model, args, path, dynamo=False, opset_version=14, input_names=list(names),
                              output_names=["logits"], dynamic_axes=dynamic)
    return str(path)


def bert(path, dynamo: bool, fixed: bool = False) -> str:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB_WORDS) + 4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    _perturb(model, torch)
    ids = torch.ones(1 if fixed else 2, SEQ, dtype=torch.long)
    names = ("input_ids", "attention_mask")
    dynamic = None if fixed else {n: {0: "batch", 1: "seq"} for n in names}
    return export_onnx(model, (ids, torch.ones_like(ids)), path, names, dynamo, dynamic)


def mobilebert(path, dynamo: bool) -> str:
    import torch
    from transformers import MobileBertConfig, MobileBertForSequenceClassification

    torch.manual_seed(0)
    cfg = MobileBertConfig(vocab_size=len(VOCAB_WORDS) + 4, hidden_size=32, embedding_size=16, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=32, intra_bottleneck_size=16, true_hidden_size=16,
                           num_feedforward_networks=2, max_position_embeddings=64, num_labels=2)
    model = MobileBertForSequenceClassification(cfg).eval()
    _perturb(model, torch)
    ids = torch.ones(2, SEQ, dtype=torch.long)
    names = ("input_ids", "attention_mask")
    return export_onnx(model, (ids, torch.ones_like(ids)), path, names, dynamo, {n: {0: "batch", 1: "seq"} for n in names})


def vit(path, dynamo: bool) -> str:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=4, intermediate_size=64, num_labels=10)
    model = ViTForImageClassification(cfg).eval()
    _perturb(model, torch)
    x = torch.randn(2, 1, 8, 8)
    return export_onnx(model, (x,), path, ("pixel_values",), dynamo, {"pixel_values": {0: "batch"}})


def text_data(path, count: int, seed: int, tokenizer: str | None = None) -> str:
    path.write_text("\n".join(sentences(count, seed)) + "\n")
    return str(path)


def image_data(path, count: int, seed: int) -> str:
    np.save(path, np.random.default_rng(seed).standard_normal((count, 1, 8, 8)).astype(np.float32))
    return str(path)
