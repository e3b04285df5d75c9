"""Target `memh`: one `$readmemh` file per tensor and sample, in the word format of
`refsim.golden.memh` (the layout is specified there and in docs/GOLDEN.md)."""

from __future__ import annotations

import json

import numpy as np
from refsim.dtypes import int_type
from refsim.errors import InputError
from refsim.golden.memh import encode_words, format_words

WORD_BITS = (8, 16, 32, 64)
DEFAULT_WORD_BITS = 32


def word_bits_option(options) -> int:
    bits = int(options.get("memh_word_bits", DEFAULT_WORD_BITS))
    if bits not in WORD_BITS:
        raise InputError(f"--memh-word-bits must be one of {', '.join(map(str, WORD_BITS))}, got {bits}")
    return bits


def describe(options) -> dict:
    word_bits = word_bits_option(options)
    return {
        "word_bits": word_bits,
        "addresses": bool(options.get("memh_addresses", False)),
        "layout": "row-major elements as one little-endian two's-complement bit stream of the declared width, "
        "cut into words; element 0 in the least significant bits of word 0; one hex word per line",
    }


def check(graph, options) -> None:
    word_bits_option(options)


def _comment_safe(name: str) -> str:
    """The name as a JSON string, with no character that could end or open a comment."""
    return json.dumps(name).replace("*", "\\u002a")


def memh_text(values: np.ndarray, dtype_name: str, name: str, word_bits: int, addresses: bool = False) -> bytes:
    t = int_type(dtype_name)
    count = int(np.asarray(values).size)
    words = encode_words(values, t.bits, word_bits)
    per_word = word_bits // t.bits if t.bits <= word_bits else None
    layout = (
        f"{per_word} element(s) per word, element 0 in the least significant bits"
        if per_word
        else f"{t.bits // word_bits} words per element, least significant word first"
    )
    encoding = "two's complement" if t.signed else "unsigned"
    header = (
        f"// refsim memh: tensor {_comment_safe(name)} {t.name} {list(np.shape(values))}, {count} elements, "
        f"{words.size} words\n"
        f"// {word_bits}-bit words, {layout}; {t.bits}-bit {encoding} values\n"
    ).encode()
    if not addresses:
        return header + format_words(words, word_bits)
    digits = word_bits // 4
    lines = []
    for k, w in enumerate(words.tolist()):
        if per_word:
            first, last = k * per_word, min((k + 1) * per_word, count) - 1
        else:
            first = last = k // (t.bits // word_bits)
        lines.append(f"{w:0{digits}x} // @{k:x}: elements {first}..{last}\n")
    return header + "".join(lines).encode()


def write(ctx) -> None:
    word_bits = word_bits_option(ctx.options)
    addresses = bool(ctx.options.get("memh_addresses", False))
    for name in ctx.selected:
        t = ctx.graph.tensors[name]
        data = memh_text(ctx.sample.arrays[name], t.dtype.name, name, word_bits, addresses)
        ctx.emit(f"{ctx.file_name(name)}.memh", data, tensor=name)
