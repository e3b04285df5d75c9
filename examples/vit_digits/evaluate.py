"""The ViT-digits numbers: held-out accuracy of the float, fake-quant and integer models,
after PTQ and after quantization-aware training.

    python examples/vit_digits/evaluate.py [--qat] [--epochs 10] [--only NAME,NAME]

Splits (`splits.py`): calib.npy (200 training images) calibrates; qat_train.npy (1150) is
what QAT trains on (distillation to the float logits plus cross entropy with the labels);
test.npy (360, held out by train.py) is used for nothing but these numbers. "export" is the
time to calibrate and build the integer model, "train" the QAT time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from refsim.exporters import compare
from refsim.exporters.pipeline import build

HERE = Path(__file__).parent
# name -> (build options, QAT or not); no options: refsim export's defaults
ROWS = {
    "W8 defaults": ({}, False),
    "W8 --per-tensor": ({"per_channel": False}, False),
    "W4 defaults": ({"wbits": "4"}, False),
    "W2 defaults": ({"wbits": "2"}, False),
    "ternary": ({"wbits": "ternary"}, False),
    "A3 W8": ({"abits": 3}, False),
    "ita": ({"mode": "ita"}, False),
    "ita-partial": ({"mode": "ita-partial"}, False),
    "ternary + QAT": ({"wbits": "ternary"}, True),
    "A3 W8 + QAT": ({"abits": 3}, True),
    "ita + QAT": ({"mode": "ita"}, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qat", action="store_true", help="also the QAT rows (needs torch; minutes each)")
    p.add_argument("--only", help="comma-separated row names (see ROWS)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    names = args.only.split(",") if args.only else [n for n, (_, qat) in ROWS.items() if args.qat or not qat]
    print("| setting | float | fake-quant | integer | export s | train s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vit_digits.intq"
        for name in names:
            options, qat = ROWS[name]
            start = time.time()
            built = build(HERE / "vit_digits.onnx", HERE / "calib.npy", labels=HERE / "labels.txt", **options)
            export_s = time.time() - start
            train_s = "-"
            if qat:
                from refsim.exporters.qat import QatModel, read_class_labels

                model = QatModel(built)
                labels = read_class_labels(HERE / "qat_train_labels.txt", built.graph.metadata.get("labels"))
                trained = model.fit(HERE / "qat_train.npy", epochs=args.epochs, lr=args.lr, labels=labels)
                train_s = f"{trained.seconds:.0f}"
                model.export(out)
            else:
                built.save(out)
            report = compare(HERE / "vit_digits.onnx", out, HERE / "test.npy", labels=HERE / "test_labels.txt")
            acc = {k: 100 * v["accuracy"] for k, v in report.task.items()}
            print(f"| {name} | {acc['float']:.2f} | {acc['fake-quant']:.2f} | {acc['integer']:.2f} | {export_s:.0f} | {train_s} |",
                  flush=True)


if __name__ == "__main__":
    main()
