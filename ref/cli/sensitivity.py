"""`refsim sensitivity MODEL.onnx --calib DATA -o sensitivity.json`: per-layer, per-bit-width
sensitivity of the weights, for `refsim export --bits-from`."""

from __future__ import annotations

import os
import sys


def add_arguments(p) -> None:
    p.add_argument("model", help="float ONNX model (as for export)")
    p.add_argument("--calib", required=True, metavar="DATA", help="calibration data (never the evaluation data)")
    p.add_argument("-o", "--output", required=True, metavar="sensitivity.json", help="where to write the sensitivities")
    p.add_argument("--method", default="pwcca", choices=["pwcca", "svcca", "sqnr"],
                   help="pwcca (default), svcca (with --topk) or sqnr (whole-model output SQNR)")
    p.add_argument("--topk", type=int, metavar="K", help="SVCCA: singular directions kept per view (default: 99%% of the variance)")
    p.add_argument("--bits", default="2,4,8,16", metavar="B,B,...", help="candidate weight bit widths (default 2,4,8,16)")
    p.add_argument("--per-channel", action="store_true", help="per-output-channel weight scales (as the export will use)")
    p.add_argument("--tokenizer", metavar="tokenizer.json", help="tokenizers JSON file for text data")
    p.add_argument("--max-length", type=int, metavar="N", help="sequence length of text models")
    p.add_argument("--max-samples", type=int, metavar="N", help="use the first N calibration samples only")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="samples per float-model run (default 16)")
    p.add_argument("--plot", metavar="FILE", help="the sensitivity chart (default: beside the JSON, .png; needs matplotlib)")
    p.add_argument("--no-plot", action="store_true", help="write no chart")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    from refsim.exporters import sensitivity

    doc = sensitivity.measure(args.model, args.calib, method=args.method, topk=args.topk,
                              bits=[b.strip() for b in args.bits.split(",") if b.strip()], per_channel=args.per_channel,
                              tokenizer=args.tokenizer, max_length=args.max_length, max_samples=args.max_samples,
                              batch_size=args.batch_size, progress=not args.quiet)
    plot = None
    if not args.no_plot:
        from refsim.exporters.report.plots import sensitivity_chart
        from refsim.intq import atomic_write

        plot = args.plot or os.path.splitext(args.output)[0] + ".png"
        atomic_write(plot, sensitivity_chart(doc))
    sensitivity.save(doc, args.output)
    worst = max(doc["layers"], key=lambda e: e["sensitivity"][doc["bits"][0]])
    print(f"wrote {args.output}: {len(doc['layers'])} layers x {len(doc['bits'])} bit widths ({doc['method']}), "
          f"{doc['calibration']['samples']} calibration samples; most sensitive at {doc['bits'][0]} bits: {worst['name']}"
          + (f"; chart {plot}" if plot else ""), file=sys.stdout)
    return 0
