"""The ViT-digits numbers: held-out accuracy of the float, fake-quant and integer models.

    python examples/vit_digits/evaluate.py        # a minute or two
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from refsim.exporters import compare, export

HERE = Path(__file__).parent
CONFIGS = [
    # (mode, wbits, per_channel)
    ("ibert", "8", False),
    ("ibert", "8", True),
    ("ibert", "4", True),
    ("ibert", "2", True),
    ("ibert", "ternary", True),
    ("ita", "8", False),
    ("ita-partial", "8", False),
]


def main() -> None:
    print("| mode | weights | float | fake-quant | integer | integer vs float top-1 |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vit_digits.intq"
        for mode, wbits, per_channel in CONFIGS:
            start = time.time()
            export(HERE / "vit_digits.onnx", out, HERE / "calib.npy", mode=mode, wbits=wbits, per_channel=per_channel,
                   labels=HERE / "labels.txt")
            report = compare(HERE / "vit_digits.onnx", out, HERE / "test.npy", labels=HERE / "test_labels.txt")
            acc = {k: 100 * v["accuracy"] for k, v in report.task.items()}
            agree = report.outputs["logits"]["integer vs float"]["top1_agreement"]
            print(f"| {mode} | {wbits}{' per-channel' if per_channel else ''} | {acc['float']:.2f} % | "
                  f"{acc['fake-quant']:.2f} % | {acc['integer']:.2f} % | {100 * agree:.1f} % |  ({time.time() - start:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
