"""`refsim inspect MODEL.intq`: what a model takes, computes and weighs."""

from __future__ import annotations

import collections
import json
import os


def add_arguments(p) -> None:
    p.add_argument("model", help=".intq model file")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--nodes", action="store_true", help="also list every node")


def describe(model, path: str) -> dict:
    g = model.graph
    ops = collections.Counter(node.op for node in g.nodes)
    by_dtype: dict[str, dict[str, int]] = {}
    total_elems = 0
    for t in g.tensors.values():
        if not t.is_const:
            continue
        row = by_dtype.setdefault(t.dtype.name, {"tensors": 0, "elements": 0, "bytes": 0})
        row["tensors"] += 1
        row["elements"] += t.data.size
        row["bytes"] += t.dtype.nbytes(t.data.size)
        total_elems += t.data.size
    packed = sum(r["bytes"] for r in by_dtype.values())

    def io(ts):
        return [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape),
                 **({"scale": t.scale} if t.scale is not None else {}),
                 **({"zero_point": t.zero_point} if t.zero_point is not None else {})} for t in ts]

    return {
        "file": path,
        "file_bytes": os.path.getsize(path),
        "graph": g.name,
        "inputs": io(model.inputs),
        "outputs": io(model.outputs),
        "nodes": len(g.nodes),
        "ops": dict(sorted(ops.items())),
        "constants_by_dtype": by_dtype,
        "constant_bytes": packed,
        "float32_bytes": 4 * total_elems,
        "metadata_keys": sorted(g.metadata),
        "blobs": {name: len(data) for name, data in g.blobs.items()},
        "node_list": [{"name": n.name, "op": n.op, "inputs": n.inputs, "outputs": n.outputs, "attrs": n.attrs} for n in g.nodes],
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n} B"


def main(args) -> int:
    from refsim.engine import load

    model = load(args.model)
    d = describe(model, args.model)
    if not args.nodes:
        d.pop("node_list")
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['file']}: graph {d['graph']!r}, {d['nodes']} nodes, {_mb(d['file_bytes'])} on disk")
    for label in ("inputs", "outputs"):
        print(f"{label}:")
        for t in d[label]:
            extra = f"  scale {t['scale']}" if "scale" in t else ""
            print(f"  {t['name']}: {t['dtype']}{t['shape']}{extra}")
    print("ops:")
    for name, count in d["ops"].items():
        print(f"  {name:<16} {count}")
    print("constants:")
    for dtype, row in sorted(d["constants_by_dtype"].items()):
        print(f"  {dtype:<8} {row['tensors']:>5} tensors {row['elements']:>12} values {_mb(row['bytes']):>14}")
    if d["float32_bytes"]:
        ratio = d["float32_bytes"] / max(d["constant_bytes"], 1)
        print(f"  total {_mb(d['constant_bytes'])} packed vs {_mb(d['float32_bytes'])} as float32 ({ratio:.2f}x smaller)")
    if d["metadata_keys"]:
        print(f"metadata: {', '.join(d['metadata_keys'])}")
    if d["blobs"]:
        print("blobs: " + ", ".join(f"{k} ({_mb(v)})" for k, v in d["blobs"].items()))
    if args.nodes:
        print("nodes:")
        for n in d["node_list"]:
            attrs = " ".join(f"{k}={v}" for k, v in n["attrs"].items())
            print(f"  {n['name']}: {n['op']}({', '.join(n['inputs'])}) -> {', '.join(n['outputs'])} {attrs}")
    return 0
