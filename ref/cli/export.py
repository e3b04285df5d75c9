"""`refsim export MODEL.onnx -o OUT.intq --calib DATA`: post-training quantization to .intq."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p) -> None:
    p.add_argument("model", help="float ONNX model (as torch.onnx.export writes it)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.intq", help="integer model to write")
    p.add_argument("--calib", required=True, metavar="DATA",
                   help="calibration data: text lines (with --tokenizer), .npy (one input) or .npz (keyed by input name)")
    p.add_argument("--mode", default="ibert", choices=["ibert", "ita", "ita-partial"],
                   help="integer arithmetic to target: I-BERT (default), ITA with ITAMax, ITA with ITAPartialMax")
    p.add_argument("--wbits", default="8", choices=["2", "3", "4", "5", "6", "7", "8", "16", "ternary"],
                   help="weight bits (default 8; ternary: BitNet b1.58)")
    p.add_argument("--abits", default=8, type=int, choices=[2, 3, 4, 5, 6, 7, 8, 16],
                   help="bits of activations entering matrix products (default 8)")
    scales = p.add_mutually_exclusive_group()
    scales.add_argument("--per-channel", dest="per_channel", action="store_const", const=True, default=None,
                        help="one weight scale per output channel (the default, except in the ita modes)")
    scales.add_argument("--per-tensor", dest="per_channel", action="store_const", const=False,
                        help="one weight scale per layer")
    p.add_argument("--calib-method", default="mse", choices=["minmax", "percentile", "mse", "entropy", "auto"],
                   help="how activation ranges are chosen (default mse; auto: per linear layer, the method "
                        "with the smallest output error)")
    p.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=None,
                   help="SmoothQuant-style smoothing of linear-layer inputs (default on, except in the ita modes)")
    p.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ weight rounding from the calibration Hessian (default on, except in the ita modes)")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=False,
                   help="correct biases for the mean error of the quantized weights (default off)")
    p.add_argument("--ita-channel-scales", action=argparse.BooleanOptionalAction, default=True,
                   help="ita modes: give each output column of the layers feeding the residual stream its own "
                        "range, folded into the weights and undone by the 16-bit residual add (default on)")
    p.add_argument("--gelu", choices=["table", "ibert"], default=None,
                   help="ibert mode's GELU: table (default; the float GELU in LiteRT's interpolated int16 table, "
                        "as TFLite Micro / CMSIS-NN run it) or ibert (I-BERT's i-GELU polynomial); the ita modes "
                        "run ITAGelu")
    p.add_argument("--percentile", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="percentiles for --calib-method percentile (default 0.01 99.99)")
    p.add_argument("--config", metavar="layers.json", help="per-layer bit widths or keep_float, by layer-name pattern")
    p.add_argument("--tokenizer", metavar="tokenizer.json", help="tokenizers JSON file, embedded in the .intq")
    p.add_argument("--max-length", type=int, metavar="N", help="sequence length of text models (pad/truncate to N)")
    p.add_argument("--labels", metavar="labels.txt", help="class names, one per line, embedded in the .intq")
    p.add_argument("--max-samples", type=int, metavar="N", help="calibrate on the first N samples only")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="samples per float-model run (default 16)")
    p.add_argument("--bits-from", metavar="sensitivity.json", help="choose weight bits per layer from `refsim sensitivity`")
    p.add_argument("--allocation", default="kmeans", choices=["kmeans", "percentile"],
                   help="with --bits-from: k-means clusters of sensitivities (default) or percentiles")
    p.add_argument("--bit-choices", default="2,4,8,16", metavar="B,B,...", help="with --bits-from: widths to choose from")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--compression", type=float, metavar="X", help="with --bits-from: at least X times smaller than float32 weights")
    budget.add_argument("--size", type=float, metavar="MB", help="with --bits-from: at most MB megabytes (10^6 bytes) of parameters")
    p.add_argument("--list-layers", action="store_true", help="print the model's layer names (for layers.json) and exit")
    qat = p.add_argument_group("quantization-aware training (needs torch: pip install 'refsim[qat]')")
    qat.add_argument("--train", metavar="DATA", nargs="+",
                     help="train the integer model's weights on DATA (read as --calib) before writing it: "
                          "distillation to the float model's outputs")
    qat.add_argument("--train-labels", metavar="FILE", help="class of each training sample (index or label), adds cross entropy")
    qat.add_argument("--epochs", type=int, default=3, metavar="N", help="passes over the training data (default 3)")
    qat.add_argument("--lr", type=float, default=1e-4, metavar="LR", help="Adam learning rate (default 1e-4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    from refsim.exporters.pipeline import export, prepare

    if args.percentile and args.calib_method != "percentile":
        args.calib_method = "percentile"
    if args.list_layers:
        _, g, *_ = prepare(args.model, args.calib, args.tokenizer, args.max_length)
        for layer in sorted({n.scope for n in g.nodes if n.scope}):
            print(layer)
        return 0
    options = dict(
        mode=args.mode, wbits=args.wbits, abits=args.abits,
        per_channel=args.per_channel, calib_method=args.calib_method, percentile=args.percentile,
        smooth=args.smooth, gptq=args.gptq, bias_correction=args.bias_correction,
        ita_channel_scales=args.ita_channel_scales, gelu=args.gelu, config=args.config, tokenizer=args.tokenizer, max_length=args.max_length, labels=args.labels,
        max_samples=args.max_samples, batch_size=args.batch_size, progress=not args.quiet,
    )
    if args.bits_from:
        from refsim.exporters.allocation import export_mixed, summary

        result = export_mixed(args.model, args.output, args.calib, args.bits_from, allocation=args.allocation,
                              bit_choices=args.bit_choices, compression=args.compression, size_mb=args.size, **options)
        print(summary(result), file=sys.stdout)
        return 0
    if args.compression is not None or args.size is not None:
        from refsim.errors import RefsimError

        raise RefsimError("--compression and --size are budgets for --bits-from sensitivity.json")
    if args.train:
        return _train_and_export(args, options)
    report = export(args.model, args.output, args.calib, **options)
    print(report.summary(), file=sys.stdout)
    return 0


def _train_and_export(args, options) -> int:
    from refsim.exporters.dyadic import ExportError

    try:
        from refsim.exporters.qat import QatModel, read_class_labels
    except ImportError as e:
        raise ExportError(f"--train needs torch ({e}); install it with: pip install 'refsim[qat]'") from None
    qat = QatModel.from_onnx(args.model, args.calib, **options)
    labels = read_class_labels(args.train_labels, qat.graph.metadata.get("labels")) if args.train_labels else None
    trained = qat.fit(args.train, epochs=args.epochs, lr=args.lr, labels=labels, progress=not args.quiet)
    report = qat.export(args.output)
    print(trained.summary(), file=sys.stdout)
    print(report.summary(), file=sys.stdout)
    return 0
