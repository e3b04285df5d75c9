"""`refsim golden MODEL.intq INPUTS -o DIR`: write golden vectors for every sample."""

from __future__ import annotations

import os


def add_arguments(p) -> None:
    p.add_argument("model", help=".intq model file")
    p.add_argument("inputs", help="input file, read exactly as `refsim run` reads it")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="folder to create for the vector set")
    p.add_argument("--targets", default="npy", metavar="LIST",
                   help="comma-separated layouts: npy (always written), memh, c, ita (default: npy)")
    p.add_argument("--tensors", metavar="GLOB", help="only tensors matching these comma-separated globs (default: all)")
    p.add_argument("--samples", type=int, metavar="N", help="only the first N samples")
    p.add_argument("--batch-axis", default="0", choices=("0", "none"),
                   help="array inputs hold samples along axis 0 (default), or 'none': the whole file is one sample")
    p.add_argument("--max-size", default="4G", metavar="SIZE",
                   help="refuse a set larger than SIZE (estimated from the first sample; default 4G, 'none': no limit)")
    p.add_argument("--force", action="store_true", help="replace DIR if it is an existing vector set")
    p.add_argument("--memh-word-bits", type=int, default=32, choices=(8, 16, 32, 64), help="memh word width (default 32)")
    p.add_argument("--memh-addresses", action="store_true", help="end each memh word line with an address comment")
    p.add_argument("--c-packed", action="store_true", help="C headers: sub-byte tensors as packed uint8_t arrays")


def main(args) -> int:
    from refsim.engine import load
    from refsim.errors import InputError
    from refsim.golden.capture import tensor_filter
    from refsim.golden.vectorset import parse_size, write_vector_set
    from refsim.hw_vectors import targets
    from refsim.inputs import load_samples
    from tqdm import tqdm

    chosen = targets(args.targets)
    wanted = tensor_filter(args.tensors) if args.tensors else None
    if args.samples is not None and args.samples < 1:
        raise InputError(f"--samples must be at least 1, got {args.samples}")
    max_bytes = parse_size(args.max_size)
    model = load(args.model)
    samples = load_samples(model, args.inputs, batch_axis=None if args.batch_axis == "none" else 0, limit=args.samples)
    options = {"memh_word_bits": args.memh_word_bits, "memh_addresses": args.memh_addresses, "c_packed": args.c_packed}
    # A bar only on a terminal (disable=None), and only when there is more than one sample.
    with tqdm(total=len(samples), unit="sample", disable=None if len(samples) > 1 else True, leave=False) as bar:
        manifest = write_vector_set(model, samples, args.out, chosen, options, wanted, args.force,
                                    model_path=args.model, inputs_path=args.inputs, max_bytes=max_bytes,
                                    progress=lambda done: bar.update(done - bar.n))
    size = sum(f["bytes"] for f in manifest["files"]) + os.path.getsize(os.path.join(args.out, "manifest.json"))
    print(
        f"wrote {args.out}: {len(manifest['samples'])} sample(s), {len(manifest['tensors'])} tensor(s), "
        f"{len(manifest['files'])} file(s), {size / 1e6:.2f} MB; targets {', '.join(chosen)}"
    )
    return 0
