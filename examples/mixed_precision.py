"""Mixed precision chosen by sensitivity against uniform 4-bit weights at the same size or less.

    python examples/mixed_precision.py vit [WORKDIR]       # ViT-digits: held-out accuracy
    python examples/mixed_precision.py minilm [WORKDIR]    # all-MiniLM-L6-v2: cosine to float (long)

Sensitivities and calibration use the calibration data only (ViT: calib.npy; MiniLM:
examples/minilm/calibration_sentences.txt); the metrics come from the held-out data only
(ViT: test.npy; MiniLM: examples/sentences.txt). Every export is per-channel, 8-bit
activations, I-BERT mode; sizes are measured from the written .intq files. Prints one
Markdown table row per configuration.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "minilm"))

from refsim.exporters import compare, export  # noqa: E402
from refsim.exporters import sensitivity as sens  # noqa: E402
from refsim.exporters.allocation import export_mixed, measure_intq  # noqa: E402


def setups(name: str, work: Path) -> dict:
    if name == "vit":
        d = HERE / "vit_digits"
        return {"model": d / "vit_digits.onnx", "calib": d / "calib.npy", "eval": d / "test.npy",
                "labels": d / "test_labels.txt", "options": {}, "budgets": []}
    from export_onnx import export as export_onnx

    onnx = work / "minilm.onnx"
    if not onnx.exists():
        export_onnx(onnx)
    return {"model": onnx, "calib": HERE / "minilm" / "calibration_sentences.txt", "eval": HERE / "sentences.txt",
            "labels": None, "options": {"tokenizer": work / "tokenizer.json", "max_length": 64},
            "budgets": [("compression", 5.0), ("compression", 6.0)]}


def metric(s: dict, intq: Path) -> str:
    report = compare(s["model"], intq, s["eval"], labels=s["labels"])
    if s["labels"] is not None:
        return f"accuracy {100 * report.task['integer']['accuracy']:.2f} % (float {100 * report.task['float']['accuracy']:.2f} %)"
    pairs = next(iter(report.outputs.values()))
    return f"cosine {pairs['integer vs float']['cosine']:.4f} (fake-quant {pairs['fake-quant vs float']['cosine']:.4f})"


def main(name: str, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    s = setups(name, work)
    common = dict(per_channel=True, **s["options"])
    sensitivity = work / f"{name}_sensitivity.json"
    if not sensitivity.exists():
        sens.save(sens.measure(s["model"], s["calib"], method="sqnr", **common), sensitivity)
    print("| model | weights | allocation | size (MB) | compression | held-out result |")
    print("|---|---|---|---|---|---|", flush=True)

    def row(label: str, allocation: str, intq: Path, started: float, float_bytes: float | None = None):
        size = measure_intq(intq)["model_bytes"]
        ratio = f"{float_bytes / size:.2f}x" if float_bytes else "-"
        print(f"| {name} | {label} | {allocation} | {size / 1e6:.3f} | {ratio} | {metric(s, intq)} |"
              f"  ({time.time() - started:.0f} s)", flush=True)
        return size

    start = time.time()
    uniform = work / f"{name}_w4.intq"
    if not uniform.exists():
        export(s["model"], uniform, s["calib"], wbits="4", **common)
    import onnx
    from refsim.exporters.allocation import float32_bytes

    float_bytes = float32_bytes(onnx.load(str(s["model"])))
    size4 = row("uniform 4-bit (tables 8-bit, the export default)", "-", uniform, start, float_bytes)
    budgets = [("size_mb", size4 / 1e6)] + s["budgets"]  # exactly the uniform model's size
    for key, value in budgets:
        for method in ("kmeans", "percentile"):
            start = time.time()
            out = work / f"{name}_mixed_{method}_{key}_{value}.intq"
            result = export_mixed(s["model"], out, s["calib"], sensitivity, allocation=method, bit_choices="2,4,8,16",
                                  **{key: value}, **common)
            counts = ", ".join(f"{n}x{b}" for b, n in sorted(result["counts"].items(), key=lambda kv: -int(kv[0])))
            budget = f"<= {value:.4f} MB (uniform's size)" if key == "size_mb" else f">= {value}x"
            row(f"mixed 2/4/8/16 ({counts} bits)", f"{method}, sqnr sensitivity, {budget}", out, start, float_bytes)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vit", Path(sys.argv[2] if len(sys.argv) > 2 else "mixed_work"))
