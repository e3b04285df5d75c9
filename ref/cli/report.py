"""`refsim report MODEL.onnx MODEL.intq DATA -o report/`: one self-contained HTML page."""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("model", help="the float ONNX model the .intq was exported from")
    p.add_argument("intq", help="integer model from `refsim export`")
    p.add_argument("data", help="evaluation data: text lines, .npy or .npz (as for compare)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write index.html into")
    p.add_argument("--labels", metavar="FILE", help="one label per sample (task metrics, as for compare)")
    p.add_argument("--sensitivity", metavar="sensitivity.json",
                   help="sensitivity chart from this file (default: the one the .intq's bits were chosen from, if any)")
    p.add_argument("--tensors", metavar="GLOB", help="histograms of the quantized tensors matching GLOB only (default: all)")
    p.add_argument("--max-samples", type=int, metavar="N", help="use the first N samples only")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="samples per run (default 16)")
    p.add_argument("--force", action="store_true", help="replace an existing report folder's index.html")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    from refsim.exporters.report.html import write_report

    path = write_report(args.model, args.intq, args.data, args.output, labels=args.labels, sensitivity=args.sensitivity,
                        tensors=args.tensors, max_samples=args.max_samples, batch_size=args.batch_size,
                        force=args.force, progress=not args.quiet)
    print(f"wrote {path}", file=sys.stdout)
    return 0
