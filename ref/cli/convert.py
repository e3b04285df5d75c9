"""`refsim convert MODEL.intq -o MODEL.onnx`: the integer graph as ONNX, for Netron."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("model", help=".intq model file")
    p.add_argument("-o", "--out", required=True, metavar="FILE.onnx", help="ONNX file to write")


def main(args) -> int:
    import onnx
    from refsim.errors import InputError
    from refsim.intq import atomic_write, load_graph
    from refsim.onnx_form import to_onnx

    if not args.out.lower().endswith(".onnx"):
        raise InputError(f"{args.out}: the output of `refsim convert` is an ONNX file; name it *.onnx")
    graph = load_graph(args.model)
    model = to_onnx(graph)
    data = model.SerializeToString()
    if len(data) >= 2**31:
        raise InputError(f"{args.model}: the ONNX form would take {len(data)} bytes, over protobuf's 2 GB limit")
    onnx.checker.check_model(model)
    atomic_write(args.out, data)
    n_const = sum(1 for t in graph.tensors.values() if t.is_const)
    print(f"wrote {args.out}: {len(graph.nodes)} nodes (domain refsim), {n_const} integer initializers; "
          f"`refsim import {args.out}` reads it back")
    return 0
