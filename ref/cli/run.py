"""`refsim run MODEL.intq INPUTS`: run a model on every sample of an input file."""

from __future__ import annotations

import io
import json
import sys

import numpy as np


def add_arguments(p) -> None:
    p.add_argument("model", help=".intq model file")
    p.add_argument("inputs", help="input file: text lines (numbers, or raw text with an embedded tokenizer), .npy or .npz; '-' reads stdin")
    p.add_argument("--out", metavar="FILE.npz", help="also save every output to an .npz file")
    p.add_argument("--json", action="store_true", help="print outputs as JSON")
    p.add_argument("--outputs", metavar="NAMES", help="comma-separated tensors to return instead of the graph outputs")
    p.add_argument("--samples", type=int, metavar="N", help="only the first N samples")
    p.add_argument("--float", action="store_true",
                   help="also print outputs as floats, (q - zero_point) * scale with their stored scale")
    p.add_argument("--batch-axis", default="0", choices=("0", "none"),
                   help="array inputs hold samples along axis 0 (default), or 'none': the whole file is one sample")
    add_dataset_arguments(p)


def add_dataset_arguments(p) -> None:
    """--batch-size, --workers, --ray and --quiet, shared by commands that run many samples."""
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="samples stacked into one run when the model's inputs share a batch dimension (default 16)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (default 1: this one)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run batches on a Ray cluster at ADDRESS (default: start a local one); needs refsim[ray]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_dataset(model, samples, args, outputs=None):
    """Every sample's outputs, in order, with a progress bar on a terminal for long runs."""
    from refsim.dataset import run_samples
    from tqdm import tqdm

    with tqdm(total=len(samples), unit="sample", disable=True if args.quiet or len(samples) < 2 else None,
              file=sys.stderr, leave=False) as bar:
        return run_samples(model, samples, batch_size=args.batch_size, workers=args.workers, ray=args.ray,
                           outputs=outputs, progress=bar.update)


def stack_outputs(results: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One array per output: samples joined along axis 0 when their shapes allow."""
    if len(results) == 1:
        return dict(results[0])
    merged = {}
    for name in results[0]:
        arrays = [r[name] for r in results]
        if all(a.ndim and a.shape[1:] == arrays[0].shape[1:] for a in arrays):
            merged[name] = np.concatenate(arrays, axis=0)
        else:
            for i, a in enumerate(arrays):
                merged[f"{name}.{i}"] = a
    return merged


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    from refsim.intq import atomic_write

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, buffer.getvalue())


def _prediction(model, name: str, array: np.ndarray) -> str | None:
    labels = model.metadata.get("labels")
    if not labels or array.ndim == 0 or array.shape[-1] != len(labels):
        return None
    index = np.argmax(array.reshape(-1, array.shape[-1]), axis=-1)
    return ", ".join(str(labels[i]) for i in index)


def _scale_entry(model, name: str) -> dict:
    from refsim.boundary import output_spec

    spec = output_spec(model, name)
    if spec is None:
        return {}
    out = {"scale": spec["scale"], "zero_point": spec.get("zero_point", 0)}
    if "axis" in spec:
        out["axis"] = spec["axis"]
    return out


def main(args) -> int:
    from refsim.engine import load
    from refsim.inputs import load_samples

    model = load(args.model)
    samples = load_samples(model, args.inputs, batch_axis=None if args.batch_axis == "none" else 0, limit=args.samples)
    wanted = args.outputs.split(",") if args.outputs else None
    results = run_dataset(model, samples, args, wanted)
    floats = [model.dequantize_outputs(r) for r in results] if args.float else None
    scales = {name: _scale_entry(model, name) for name in (results[0] if results else {})}
    if args.float and not any(scales.values()):
        print("refsim: note: no output of this model records a scale; printing integers only", file=sys.stderr)
    if args.json:
        doc = {
            "model": args.model,
            "samples": [
                {
                    "source": s.source,
                    **({"text": s.text} if s.text is not None else {}),
                    "outputs": {
                        name: {
                            "dtype": model.graph.tensors[name].dtype.name, "shape": list(a.shape), "values": a.tolist(),
                            **scales[name],
                            **({"float_values": np.asarray(f[name], np.float64).tolist()}
                               if f is not None and scales[name] else {}),
                        }
                        for name, a in r.items()
                    },
                }
                for s, r, f in zip(samples, results, floats or [None] * len(results))
            ],
        }
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        for i, (s, r) in enumerate(zip(samples, results)):
            print(f"# {s.source}" + (f": {s.text}" if s.text is not None else ""))
            for name, a in r.items():
                t = model.graph.tensors[name]
                label = _prediction(model, name, a)
                values = np.array2string(a, threshold=64, max_line_width=100, separator=" ")
                print(f"{name} {t.dtype}{list(a.shape)} = {values}" + (f"  -> {label}" if label else ""))
                if floats is not None and scales[name]:
                    f = np.array2string(floats[i][name], threshold=64, max_line_width=100, separator=" ", precision=4)
                    scale = scales[name]["scale"]
                    about = f"scale {float(np.ravel(scale)[0]):g}" if np.size(scale) == 1 else "per-channel scale"
                    print(f"{name} float ({about}) = {f}")
    if args.out:
        save_npz(args.out, stack_outputs(results))
    return 0
