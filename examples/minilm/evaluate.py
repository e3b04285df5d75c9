"""The MiniLM numbers: mean cosine similarity of integer (and fake-quant) sentence embeddings
to the float model's, over the 222 evaluation sentences of examples/sentences.txt,
calibrated on examples/minilm/calibration_sentences.txt (no sentence in both).

    python examples/minilm/evaluate.py [WORKDIR]      # about ten CPU minutes

Prints one table row per configuration: mode, weight bits, per-channel, layers.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from export_onnx import export as export_onnx  # noqa: E402
from refsim.exporters import compare, export  # noqa: E402

CONFIGS = [
    # (mode, wbits, per_channel, layers.json)
    ("ibert", "8", True, None),
    ("ibert", "8", True, HERE / "layers.json"),
    ("ibert", "4", True, None),
    ("ibert", "4", True, HERE / "layers.json"),
    ("ita", "8", False, None),
]


def main(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    onnx = workdir / "minilm.onnx"
    if not onnx.exists():
        export_onnx(onnx)
    print("| mode | weights | activations | fake-quant cos | integer cos | integer vs fake-quant |")
    print("|---|---|---|---|---|---|")
    for mode, wbits, per_channel, config in CONFIGS:
        start = time.time()
        out = workdir / "minilm.intq"
        export(onnx, out, HERE / "calibration_sentences.txt", tokenizer=workdir / "tokenizer.json", max_length=64,
               mode=mode, wbits=wbits, per_channel=per_channel, config=config)
        report = compare(onnx, out, HERE.parent / "sentences.txt")
        pairs = report.outputs["sentence_embedding"]
        acts = "8 (16 into *.output.dense)" if config else "8"
        weights = f"{wbits}{' per-channel' if per_channel else ''}"
        print(f"| {mode} | {weights} | {acts} | {pairs['fake-quant vs float']['cosine']:.4f} | "
              f"{pairs['integer vs float']['cosine']:.4f} | {pairs['integer vs fake-quant']['cosine']:.4f} |"
              f"  ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "minilm_work"))
