"""`refsim compare MODEL.onnx OUT.intq DATA`: float vs fake-quant vs integer, per output and layer;
for an imported `.intq` (`refsim import`), its integer tensors against onnxruntime's on the
quantized MODEL, by ONNX name (`exporters.lineup`)."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("model", help="the float ONNX model the .intq was exported from, or the quantized one it was imported from")
    p.add_argument("intq", help="integer model from `refsim export` or `refsim import`")
    p.add_argument("data", help="evaluation data: text lines, .npy or .npz (as for export)")
    p.add_argument("--labels", metavar="FILE", help="one label per sample: class name or index, or a number (regression)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--max-samples", type=int, metavar="N", help="use the first N samples only")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="samples per run (default 16)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--float-nonlinear", action="store_true",
                   help="the fake-quant model keeps float softmax, GELU and LayerNorm instead of computing the "
                        "integer model's approximations exactly (shows what those approximations cost)")


def main(args) -> int:
    import refsim
    from refsim.exporters.comparison import compare
    from refsim.exporters.dyadic import ExportError
    from refsim.exporters.lineup import lineup

    metadata = refsim.load(args.intq).metadata
    if "import" in metadata and "fake_quant" not in metadata:
        if args.labels is not None:
            raise ExportError(f"{args.intq}: --labels needs an .intq from `refsim export`; an imported one is "
                              "compared tensor by tensor with onnxruntime")
        report = lineup(args.model, args.intq, args.data, max_samples=args.max_samples)
    else:
        report = compare(args.model, args.intq, args.data, labels=args.labels, batch_size=args.batch_size,
                         progress=not args.quiet, max_samples=args.max_samples,
                         nonlinear="float" if args.float_nonlinear else "integer")
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(report.text())
    return 0
