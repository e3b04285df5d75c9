"""The MiniLM fidelity table: float vs fake-quant vs integer sentence embeddings, per export
setting, on held-out sentences.

    python examples/minilm/evaluate.py [WORKDIR] [--only NAME,NAME] [--qat] [--max-length 128]

("W8A3 ..." rows: 3-bit activations, the MobileBERT seed's setting.)

Three disjoint splits (no sentence in two of them):

- calibration_sentences.txt (118): what every export calibrates on;
- train_sentences.txt (264): what quantization-aware training (--qat rows) trains on,
  distilling the float model's embedding;
- ../sentences.txt (222): the evaluation set, used for nothing but these numbers.
  (dev_sentences.txt, 118 more, is where the defaults were chosen.)

The float model is calibrated once; every row reuses those statistics (`build(...,
calibration=...)`), so "export" is the time to build that row's integer model from them
(PTQ included), and "train" the QAT time. Cosines are per sentence, averaged (worst in
brackets).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from export_onnx import export as export_onnx  # noqa: E402
from refsim.exporters import compare  # noqa: E402
from refsim.exporters.pipeline import build  # noqa: E402

# name -> (build options, QAT epochs or None); the first row's options are refsim export's defaults
ROWS = {
    "W8A8 defaults": ({}, None),
    "W8A8 --per-tensor": ({"per_channel": False}, None),
    "W8A8 --no-smooth": ({"smooth": False}, None),
    "W8A8 --no-gptq": ({"gptq": False}, None),
    "W8A8 --no-smooth --no-gptq": ({"smooth": False, "gptq": False}, None),
    "W8A8 --bias-correction": ({"bias_correction": True}, None),
    "W8A8 --calib-method entropy": ({"calib_method": "entropy"}, None),
    "W8A8 --calib-method auto": ({"calib_method": "auto"}, None),
    "W8A8 --calib-method minmax": ({"calib_method": "minmax"}, None),
    "W4A8 defaults": ({"wbits": "4"}, None),
    "W4A8 --no-gptq": ({"wbits": "4", "gptq": False}, None),
    "W4A8 --no-smooth": ({"wbits": "4", "smooth": False}, None),
    "ita defaults": ({"mode": "ita"}, None),
    "ita-partial defaults": ({"mode": "ita-partial"}, None),
    "W4A8 + QAT": ({"wbits": "4"}, 3),
    "ita + QAT": ({"mode": "ita"}, 3),
    "W8A3 defaults": ({"abits": 3}, None),
    "W8A3 + QAT": ({"abits": 3}, 3),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", nargs="?", default="minilm_work")
    p.add_argument("--only", help="comma-separated row names (default: all without QAT; see ROWS)")
    p.add_argument("--qat", action="store_true", help="also the QAT rows (needs torch; minutes each)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4, help="QAT learning rate")
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    onnx = workdir / "minilm.onnx"
    if not onnx.exists():
        export_onnx(onnx)
    names = args.only.split(",") if args.only else [n for n, (_, epochs) in ROWS.items() if args.qat or epochs is None]
    common = dict(tokenizer=workdir / "tokenizer.json", max_length=args.max_length)
    start = time.time()
    first = build(onnx, HERE / "calibration_sentences.txt", **common)
    print(f"calibrated on {len(first.dataset)} sentences in {time.time() - start:.0f} s (sequence {args.max_length})", flush=True)
    print("| setting | fake-quant vs float | integer vs float (worst) | integer vs fake-quant | export s | train s |")
    print("|---|---|---|---|---|---|")
    for name in names:
        options, epochs = ROWS[name]
        start = time.time()
        built = build(onnx, HERE / "calibration_sentences.txt", calibration=first.calibration, **common, **options)
        export_s = time.time() - start
        out = workdir / "row.intq"
        train_s = "-"
        if epochs is None:
            built.save(out)
        else:
            from refsim.exporters.qat import QatModel

            qat = QatModel(built)
            trained = qat.fit(HERE / "train_sentences.txt", epochs=epochs, lr=args.lr)
            train_s = f"{trained.seconds:.0f}"
            qat.export(out)
        pairs = compare(onnx, out, HERE.parent / "sentences.txt").outputs["sentence_embedding"]
        fq, it, both = pairs["fake-quant vs float"], pairs["integer vs float"], pairs["integer vs fake-quant"]
        print(f"| {name} | {fq['cosine']:.4f} | {it['cosine']:.4f} ({it['cosine_min']:.3f}) | {both['cosine']:.4f} "
              f"| {export_s:.0f} | {train_s} |", flush=True)


if __name__ == "__main__":
    main()
