"""Writes vit_ita.onnx, calib.npy and images.npy: a random-init Hugging Face ViT shaped for
ITA (S = 64 tokens: 63 patches of 2x2 pixels from a 14x18 image, plus the class token;
E = 64, one head so P = 64, F = 128, two encoder layers), for `refsim export --mode ita`
and `refsim golden --targets ita` (README, docs/ITA.md). Needs torch and transformers:

    python examples/ita/make_model.py
"""

from pathlib import Path

import numpy as np
import torch
from transformers import ViTConfig, ViTForImageClassification

HERE = Path(__file__).resolve().parent


def main() -> None:
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=(14, 18), patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=1, intermediate_size=128, num_labels=10)
    model = ViTForImageClassification(cfg).eval()
    with torch.no_grad():  # random LayerNorm parameters and biases, so that none is trivially 1 or 0
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    rng = np.random.default_rng(1)
    images = rng.standard_normal((18, 1, 14, 18)).astype(np.float32)
    torch.onnx.export(model, (torch.from_numpy(images[:1]),), HERE / "vit_ita.onnx", dynamo=False, opset_version=17,
                      input_names=["pixel_values"], output_names=["logits"])
    np.save(HERE / "calib.npy", images[:16])
    np.save(HERE / "images.npy", images[16:])


if __name__ == "__main__":
    main()
