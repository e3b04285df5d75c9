"""The memh word format: Verilog `$readmemh` text, written by the `memh` target and read back
from hardware dumps by `refsim check`.

The layout, completely (docs/GOLDEN.md says the same for testbench authors):

- The tensor is flattened in row-major order (last index fastest): element 0, 1, 2, ...
- Each element is written as `b`-bit two's complement (`b` = the declared width: 2 for
  int2/uint2/ternary, 4, 8, 16, 32 or 64; unsigned types as plain binary).
- The elements form one little-endian bit stream: element i occupies bits [i*b, (i+1)*b).
- The stream is cut into words of `W` bits (`--memh-word-bits`, 8/16/32/64, default 32);
  word k holds bits [k*W, (k+1)*W). So with b <= W, a word holds W/b elements, element 0
  in the least significant lane; with b > W, an element spans b/W consecutive words,
  least significant word first. The last word is zero-padded.
- One word per line, exactly W/4 lowercase hex digits, no prefix. Lines starting with `//`
  are comments (a header naming the tensor, its type and shape). With
  `--memh-addresses` each word line ends with `// @<word address>: elements i..j`.

`$readmemh("x.memh", mem)` into `reg [W-1:0] mem [0:N-1]` loads word k at mem[k].
"""

from __future__ import annotations

import re

import numpy as np
from refsim.dtypes import int_type, pack_lanes
from refsim.errors import InputError

# --- encoding ---------------------------------------------------------------------------


def encode_words(values: np.ndarray, bits: int, word_bits: int) -> np.ndarray:
    """The tensor as uint64 words of `word_bits` bits (see the module docstring)."""
    if bits <= word_bits:
        return pack_lanes(values, bits, word_bits)
    flat = np.ascontiguousarray(values).reshape(-1).astype(np.int64).view(np.uint64)
    per_element = bits // word_bits
    word_mask = np.uint64((1 << word_bits) - 1)
    shifts = np.arange(per_element, dtype=np.uint64) * np.uint64(word_bits)
    return ((flat[:, None] >> shifts[None, :]) & word_mask).reshape(-1)


def decode_words(words: np.ndarray, bits: int, signed: bool, count: int, word_bits: int) -> np.ndarray:
    """Inverse of `encode_words`: `count` int64 values."""
    words = np.asarray(words, dtype=np.uint64)
    if bits <= word_bits:
        lanes = word_bits // bits
        shifts = np.arange(lanes, dtype=np.uint64) * np.uint64(bits)
        fields = ((words[:, None] >> shifts[None, :]) & np.uint64((1 << bits) - 1)).reshape(-1)[:count]
    else:
        per_element = bits // word_bits
        usable = words[: (words.size // per_element) * per_element].reshape(-1, per_element)
        shifts = np.arange(per_element, dtype=np.uint64) * np.uint64(word_bits)
        fields = np.bitwise_or.reduce(usable << shifts[None, :], axis=1)[:count] if usable.size else usable.reshape(-1)
    if bits == 64:
        return fields.view(np.int64) if signed else fields.astype(np.int64)
    values = fields.astype(np.int64)
    if signed:
        values = np.where(values >= (1 << (bits - 1)), values - (1 << bits), values)
    return values


def words_needed(count: int, bits: int, word_bits: int) -> int:
    return (count * bits + word_bits - 1) // word_bits


def format_words(words: np.ndarray, word_bits: int) -> bytes:
    """One zero-padded lowercase hex word per line."""
    digits = word_bits // 4
    if words.size == 0:
        return b""
    text = np.frombuffer(words.astype(">u8").tobytes().hex().encode(), dtype="S1").reshape(-1, 16)[:, 16 - digits :]
    lines = np.concatenate([text, np.full((text.shape[0], 1), b"\n", dtype="S1")], axis=1)
    return lines.tobytes()


# --- parsing (for `refsim check` dumps) ------------------------------------------------------

# One pass, leftmost first: a `/*` inside a `//` comment starts nothing, as in Verilog.
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


class MemhError(InputError):
    """A memh file cannot be parsed."""


def parse_words(text: str, word_bits: int, where: str) -> np.ndarray:
    """The words of a `$readmemh` file, in address order; `@addr` jumps allowed, no holes."""
    text = _COMMENT.sub(" ", text)
    words: dict[int, int] = {}
    address = 0
    limit = 1 << word_bits
    for token in text.split():
        if token.startswith("@"):
            try:
                address = int(token[1:], 16)
            except ValueError:
                raise MemhError(f"{where}: bad address {token!r}") from None
            continue
        try:
            value = int(token.replace("_", ""), 16)
        except ValueError:
            raise MemhError(f"{where}: {token!r} is not a hex word (x/z values cannot be compared)") from None
        if value >= limit:
            raise MemhError(f"{where}: word {token!r} at address {address:#x} is wider than {word_bits} bits")
        words[address] = value
        address += 1
    if not words:
        return np.zeros(0, np.uint64)
    size = max(words) + 1
    if len(words) != size:
        missing = next(a for a in range(size) if a not in words)
        raise MemhError(f"{where}: no word at address {missing:#x} (the file has holes)")
    return np.array([words[a] for a in range(size)], dtype=np.uint64)


def read_values(path, dtype_name: str, count: int, word_bits: int) -> tuple[np.ndarray, int]:
    """Values of a memh dump: (at most `count` values decoded from it, its number of words)."""
    t = int_type(dtype_name)
    with open(path, encoding="ascii", errors="replace") as f:
        words = parse_words(f.read(), word_bits, str(path))
    held = (words.size * word_bits) // t.bits
    return decode_words(words, t.bits, t.signed, min(count, held), word_bits), int(words.size)
