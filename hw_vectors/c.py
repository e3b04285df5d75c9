"""Target `c`: one C header per sample with every selected tensor as a `static const` array.

For a tensor `fc1.out` (C identifier `fc1_out`) the header holds

    #define FC1_OUT_NDIM 2                 rank
    #define FC1_OUT_DIM0 1                 each dimension
    #define FC1_OUT_DIM1 32
    #define FC1_OUT_SIZE 32                element count
    static const int8_t fc1_out[32] = {...};   row-major (C order)

and, when a `Requant` (or `RequantShift`) node produced it, that node's parameters:
`FC1_OUT_RQ_MUL`, `_RQ_SHIFT`, `_RQ_BIAS`, `_RQ_OFFSET` as `#define`s when they are one
number, or `static const` arrays `fc1_out_rq_mul[...]` when they are per channel (with
`FC1_OUT_RQ_AXIS`), plus `_RQ_LO`, `_RQ_HI` (the clip range) and `_RQ_ROUNDING` (a string).

Array types are the stdint types of the declared width: int8_t ... int64_t, uint8_t ...
uint32_t. Sub-byte tensors (int4, uint4, int2, uint2, ternary) are one value per
int8_t/uint8_t element, or, with `--c-packed`, a `uint8_t <name>_packed[<NAME>_PACKED_BYTES]`
array packed as in ONNX: element 0 in the least significant bits, two's complement in the
field, last byte zero-padded. Identifiers are unique in the header; the comment above each
array gives the tensor's real name.

For a model imported from TFLite, every layer also gets a folder of headers in CMSIS-NN's
test-data layout (`refsim.hw_vectors.cmsis_nn`).
"""

from __future__ import annotations

import json
import re

import numpy as np
from refsim import __version__
from refsim.dtypes import IntType, pack

C_TYPES = {
    "int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "uint16": "uint16_t",
    "int32": "int32_t", "uint32": "uint32_t", "int64": "int64_t",
    "int4": "int8_t", "int2": "int8_t", "ternary": "int8_t", "uint4": "uint8_t", "uint2": "uint8_t",
}
_C_KEYWORDS = {
    "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum",
    "extern", "float", "for", "goto", "if", "inline", "int", "long", "register", "restrict", "return",
    "short", "signed", "sizeof", "static", "struct", "switch", "typedef", "union", "unsigned", "void",
    "volatile", "while", "bool", "true", "false", "main",
}
REQUANT_PARAMS = {"Requant": ("mul", "shift", "bias", "offset"), "RequantShift": ("mul", "add")}


def describe(options) -> dict:
    return {
        "packed_sub_byte": bool(options.get("c_packed", False)),
        "layout": "one header per sample; static const stdint arrays in row-major order; #defines for shapes and requantization",
    }


def c_literal(value: int, type_name: str) -> str:
    """A C integer constant of the right type, valid even at the type's minimum."""
    if type_name == "int64_t":
        return "(-9223372036854775807LL - 1)" if value == -(1 << 63) else f"{value}LL"
    if type_name == "int32_t" and value == -(1 << 31):
        return "(-2147483647 - 1)"
    if type_name == "uint32_t":
        return f"{value}u"
    return str(value)


def comment_safe(text: str) -> str:
    """Text for inside a comment: JSON-escaped, '*' too, so it can neither end nor open one."""
    return json.dumps(text).replace("*", "\\u002a")


def _array(ident: str, type_name: str, values, comment: str | None = None) -> str:
    flat = [c_literal(int(v), type_name) for v in np.asarray(values).reshape(-1).tolist()]
    head = f"/* {comment} */\n" if comment else ""
    if not flat:
        return head + f"/* {ident}: no elements */\n"
    rows = [", ".join(flat[i : i + 16]) for i in range(0, len(flat), 16)]
    body = ",\n    ".join(rows)
    return head + f"static const {type_name} {ident}[{len(flat)}] = {{\n    {body}\n}};\n"


class _Identifiers:
    """Hands out C identifiers whose every derived name (macros, param arrays) is unused."""

    def __init__(self):
        self.used: set[str] = set()

    def claim(self, name: str, derived) -> str:
        base = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_]", "_", name)).strip("_")[:80] or "t"
        if base[0].isdigit() or base in _C_KEYWORDS or base.upper().startswith("REFSIM_GOLDEN"):
            base = "t_" + base
        ident, counter = base, 1
        while True:
            names = {ident, *derived(ident)}
            if not names & self.used:
                self.used |= names
                return ident
            counter += 1
            ident = f"{base}_{counter}"


def _const_param(graph, name: str):
    if not name:
        return None
    t = graph.tensors.get(name)
    return t if t is not None and t.is_const else None


def _requant_section(graph, node, ident: str) -> tuple[list[str], str]:
    """(#define lines, array text) for the parameters of the Requant node that produced a tensor."""
    macro = ident.upper()
    defines, arrays = [], []
    for position, param in enumerate(REQUANT_PARAMS[node.op], start=1):
        t = _const_param(graph, node.inputs[position] if position < len(node.inputs) else "")
        if t is None:
            continue
        values = np.asarray(t.data).reshape(-1)
        ctype = C_TYPES[t.dtype.name]
        if values.size == 1:
            defines.append(f"#define {macro}_RQ_{param.upper()} {c_literal(int(values[0]), ctype)}")
        else:
            arrays.append(_array(f"{ident}_rq_{param}", ctype, values, f"{node.name}: per-channel {param}"))
    attrs = {**_defaults(node.op), **node.attrs}
    if node.op == "Requant":
        from refsim.ops.requant import output_bounds

        lo, hi = output_bounds(attrs["dtype"], attrs.get("lo"), attrs.get("hi"), node.name)
        defines += [
            f"#define {macro}_RQ_AXIS {attrs['axis']}",
            f"#define {macro}_RQ_LO {lo}",
            f"#define {macro}_RQ_HI {hi}",
            f'#define {macro}_RQ_ROUNDING "{attrs["rounding"]}"',
        ]
    else:
        defines += [f"#define {macro}_RQ_DIV {attrs['div']}", f"#define {macro}_RQ_N_LEVELS {attrs['n_levels']}"]
    return defines, "".join(arrays)


def _defaults(op_name: str) -> dict:
    from refsim.ops import lookup

    return dict(lookup(op_name).defaults)


def _derived(shape, requant_node, packed: bool):
    def names(ident: str):
        macro = ident.upper()
        out = {macro, f"{macro}_NDIM", f"{macro}_SIZE", f"{ident}_packed", f"{macro}_PACKED_BYTES"}
        out |= {f"{macro}_DIM{k}" for k in range(len(shape))}
        if requant_node is not None:
            for p in REQUANT_PARAMS[requant_node.op] + ("axis", "lo", "hi", "rounding", "div", "n_levels"):
                out |= {f"{macro}_RQ_{p.upper()}", f"{ident}_rq_{p}"}
        return out

    return names


def header_text(ctx) -> str:
    sample = ctx.sample
    packed = bool(ctx.options.get("c_packed", False))
    guard = f"REFSIM_GOLDEN_{ctx.dir.upper()}_H"
    lines = [
        f"/* refsim {__version__} golden vectors: model {comment_safe(ctx.graph.name)}, "
        f"sample {sample.index} ({comment_safe(sample.source)}).",
        " * Arrays are row-major (C order). Generated; do not edit. */",
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        "#include <stdint.h>",
        "",
    ]
    idents = _Identifiers()
    idents.used.add(guard)
    for name in ctx.selected:
        array = sample.arrays[name]
        t: IntType = ctx.graph.tensors[name].dtype
        node = sample.producers.get(name)
        requant = node if node is not None and node.op in REQUANT_PARAMS else None
        ident = idents.claim(name, _derived(array.shape, requant, packed))
        macro = ident.upper()
        origin = f"{node.op} node {comment_safe(node.name)}" if node is not None else "graph input"
        lines.append(f"/* {comment_safe(name)}: {t.name} {list(array.shape)}, from {origin} */")
        lines.append(f"#define {macro}_NDIM {array.ndim}")
        lines += [f"#define {macro}_DIM{k} {d}" for k, d in enumerate(array.shape)]
        lines.append(f"#define {macro}_SIZE {array.size}")
        if requant is not None:
            defines, arrays = _requant_section(ctx.graph, requant, ident)
            lines += defines
            if arrays:
                lines.append(arrays.rstrip("\n"))
        if packed and t.packed:
            data = np.frombuffer(pack(array, t), dtype=np.uint8)
            lines.append(f"#define {macro}_PACKED_BYTES {data.size}")
            comment = f"{t.bits}-bit fields, element 0 in the least significant bits, two's complement"
            lines.append(_array(f"{ident}_packed", "uint8_t", data, comment).rstrip("\n"))
        else:
            lines.append(_array(ident, C_TYPES[t.name], array).rstrip("\n"))
        lines.append("")
    lines += [f"#endif /* {guard} */", ""]
    return "\n".join(lines)


def header_name(ctx) -> str:
    return f"golden_{ctx.dir}.h"


def write(ctx) -> None:
    ctx.emit(header_name(ctx), header_text(ctx).encode("ascii"))
    from . import cmsis_nn  # models imported from TFLite: CMSIS-NN's per-layer test data too

    cmsis_nn.write(ctx)
