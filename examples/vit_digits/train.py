"""Train the small ViT shipped in examples/vit_digits on scikit-learn's 8x8 digits.

    python examples/vit_digits/train.py            # a few CPU minutes; rewrites the files below

Writes, next to this script:

- vit_digits.onnx   the float model (torch.onnx.export, dynamo exporter, opset 20)
- labels.txt        class names "0".."9"
- calib.npy         200 training images for calibration, float32 (N, 1, 8, 8), pixels / 16
- test.npy          the held-out split (20 %, stratified, seed 0), never seen in training
- test_labels.txt   its labels, one per line
- digits.npy        four test images for `refsim run`

Model: ViTForImageClassification, 2x2 patches (16 + a CLS token), hidden size 64, 2 layers,
4 heads, MLP 128. Reproducible: fixed seeds, deterministic CPU kernels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from transformers import ViTConfig, ViTForImageClassification

HERE = Path(__file__).parent
EPOCHS = 150


def data():
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)


def main() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    x_train, x_test, y_train, y_test = data()
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=10,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = EPOCHS * ((len(x_train) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 64):
            idx = order[start:start + 64]
            # Light augmentation: shift by one pixel at random.
            shift = torch.randint(-1, 2, (2,), generator=generator)
            batch = torch.roll(xt[idx], shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(pixel_values=batch).logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            model.eval()
            with torch.no_grad():
                acc = (model(pixel_values=torch.from_numpy(x_test)).logits.argmax(-1).numpy() == y_test).mean()
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out accuracy {acc:.4f}")
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(x_test[:2]),), HERE / "vit_digits.onnx", dynamo=True,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), external_data=False,
                          verbose=False)
    (HERE / "labels.txt").write_text("".join(f"{d}\n" for d in range(10)))
    rng = np.random.default_rng(0)
    np.save(HERE / "calib.npy", x_train[rng.choice(len(x_train), 200, replace=False)])
    np.save(HERE / "test.npy", x_test)
    (HERE / "test_labels.txt").write_text("".join(f"{int(v)}\n" for v in y_test))
    np.save(HERE / "digits.npy", x_test[:4])
    print("wrote", HERE / "vit_digits.onnx")


if __name__ == "__main__":
    main()
