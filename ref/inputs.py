"""Reading model inputs from files: `.npy`, `.npz`, or text with one sample per line.

Text lines are whitespace- or comma-separated decimal integers (`[+-]?[0-9]+`, ASCII digits)
for a model with one input; each line is one sample, shaped to the input's declared shape
with a batch of one. Lines that are empty or start with '#' are skipped. (Models with an
embedded tokenizer read raw text lines instead; see `refsim.text`.) `.npy`/`.npz` files are
read by `refsim.npyfile`: never unpickled, and each array's header is checked against the
model before its data is read.

An array file holds N samples along axis 0 (an `.npz` the same N in every array): with the
input's rank, sample i is `array[i:i+1]` (a batch of one); with one axis more, `array[i]`.
An array that has exactly the input's declared shape is one sample. `batch_axis=None`
makes the whole file one sample whatever its shape.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .boundary import input_specs, quantize_feeds
from .errors import InputError
from .ir import Tensor
from .npyfile import ArrayHeader, read_npy, read_npz


@dataclass
class Sample:
    """One set of feeds and where it came from (for messages and file names)."""

    feeds: dict[str, np.ndarray]
    source: str
    text: str | None = None


def _header_check(path: str, inputs: list[Tensor], batch_axis):
    """Compare an array file's header with the model before any data is read: the input it
    names, and a shape that can hold samples of it (see the module docstring)."""
    by_name = {t.name: t for t in inputs}

    def fits(declared, shape) -> bool:
        return len(declared) == len(shape) and all(not isinstance(d, int) or d == a for d, a in zip(declared, shape))

    def check(name: str | None, header: ArrayHeader) -> None:
        t = inputs[0] if name is None else by_name.get(name)
        if t is None:
            known = ", ".join(by_name)
            raise InputError(f"{path}: holds array {name!r}, which is not an input of the model (inputs: {known})")
        declared, shape = list(t.shape), list(header.shape)
        if batch_axis is None:
            ok = fits(declared, shape)
        else:  # one sample, samples along axis 0 at the input's rank, or with one axis more
            ok = fits(declared, shape) or (len(shape) == len(declared) and fits(declared[1:], shape[1:])) \
                or fits(declared, shape[1:])
        if not ok:
            where = f"{path}[{name!r}]" if name is not None else path
            raise InputError(f"{where}: array of shape {shape} does not fit input {t.name!r} of shape {declared}")

    return check


def _sample_shape(t: Tensor, count: int, where: str) -> tuple[int, ...]:
    """The input's declared shape for one sample of `count` values."""
    shape = list(t.shape)
    if shape and not isinstance(shape[0], int):
        shape[0] = 1
    unknown = [i for i, d in enumerate(shape) if not isinstance(d, int)]
    known = math.prod(d for d in shape if isinstance(d, int))
    if len(unknown) > 1:
        raise InputError(
            f"{where}: input {t.name!r} has shape {list(t.shape)} with several unknown "
            f"dimensions; give the input as .npy/.npz instead"
        )
    if unknown:
        if known == 0 or count % known:
            raise InputError(f"{where}: {count} numbers do not fill input {t.name!r} of shape {list(t.shape)}")
        shape[unknown[0]] = count // known
    elif count != known:
        raise InputError(f"{where}: expected {known} numbers for input {t.name!r} of shape {list(t.shape)}, got {count}")
    return tuple(shape)


_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: no '1_0', no other scripts' digits
_INT64_DIGITS = 19


def _abbreviated(token: str) -> str:
    return repr(token) if len(token) <= 24 else f"{token[:12]!r}... ({len(token)} characters)"


def _parse_numbers(line: str, where: str) -> np.ndarray:
    values = []
    for token in line.replace(",", " ").split():
        if not _INTEGER.fullmatch(token):
            raise InputError(f"{where}: {_abbreviated(token)} is not an integer (decimal digits, optional sign)")
        digits = token.lstrip("+-").lstrip("0")
        value = int(token) if len(digits) <= _INT64_DIGITS else None
        if value is None or not -(1 << 63) <= value < 1 << 63:
            raise InputError(f"{where}: {_abbreviated(token)} does not fit 64 bits")
        values.append(value)
    return np.array(values, dtype=np.int64)


def number_lines(path: str, inputs: list[Tensor], lines) -> Iterator[Sample]:
    if len(inputs) != 1:
        names = ", ".join(t.name for t in inputs)
        raise InputError(f"{path}: the model has {len(inputs)} inputs ({names}); give them as an .npz file keyed by name")
    t = inputs[0]
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{number}"
        values = _parse_numbers(text, where)
        yield Sample({t.name: values.reshape(_sample_shape(t, values.size, where))}, where)


def _sample_count(path: str, arrays: dict[str, np.ndarray], inputs: list[Tensor]) -> int | None:
    """How many samples the arrays hold along axis 0, or None for one whole sample."""
    declared = {t.name: t for t in inputs}
    counts = set()
    for name, array in arrays.items():
        t = declared.get(name)
        if t is None:
            return None  # not a model input: let the run name the problem, as for one sample
        shape = list(t.shape)
        if all(isinstance(d, int) for d in shape) and list(array.shape) == shape:
            return None
        if array.ndim not in (len(shape), len(shape) + 1) or array.ndim == 0:
            raise InputError(
                f"{path}: array {name!r} of shape {list(array.shape)} is neither samples along axis 0 of input "
                f"shape {shape} nor one sample (give --batch-axis none to feed it whole)"
            )
        counts.add(int(array.shape[0]))
    if len(counts) > 1:
        raise InputError(f"{path}: the arrays hold different numbers of samples along axis 0: {sorted(counts)}")
    return counts.pop() if counts else None


def _split_arrays(path: str, arrays: dict[str, np.ndarray], inputs: list[Tensor], batch_axis, limit) -> list[Sample]:
    count = None if batch_axis is None else _sample_count(path, arrays, inputs)
    if count is None:
        return [Sample(arrays, path)]
    ranks = {t.name: len(t.shape) for t in inputs}
    n = count if limit is None else min(count, limit)
    samples = []
    for i in range(n):
        feeds = {k: (a[i : i + 1] if a.ndim == ranks[k] else a[i]) for k, a in arrays.items()}
        samples.append(Sample(feeds, f"{path}[{i}]"))
    if not samples:
        raise InputError(f"{path}: no samples (axis 0 is empty)")
    return samples


def read_samples(path: str, inputs: list[Tensor], text_reader=None, *, batch_axis: int | None = 0,
                 limit: int | None = None) -> list[Sample]:
    """Samples from an input file; `text_reader(path, lines)` handles raw text lines.

    `batch_axis`: 0 (arrays hold samples along axis 0) or None (an array file is one
    sample); `limit`: keep at most the first `limit` samples."""
    if batch_axis not in (0, None):
        raise InputError(f"batch axis must be 0 or none, got {batch_axis!r}")
    if limit is not None and limit < 1:
        raise InputError(f"the number of samples must be at least 1, got {limit}")
    if path != "-" and not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if path.endswith(".npy"):
        if len(inputs) != 1:
            raise InputError(f"{path}: the model has {len(inputs)} inputs; give them as an .npz keyed by name")
        check = _header_check(path, inputs, batch_axis)
        return _split_arrays(path, {inputs[0].name: read_npy(path, check)}, inputs, batch_axis, limit)
    if path.endswith(".npz"):
        return _split_arrays(path, read_npz(path, _header_check(path, inputs, batch_axis)), inputs, batch_axis, limit)
    try:
        if path == "-":
            import sys

            lines = sys.stdin.read().splitlines()
        else:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text (give arrays as .npy or .npz)") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None
    reader = text_reader(path, lines) if text_reader is not None else number_lines(path, inputs, lines)
    samples = list(reader if limit is None else itertools.islice(reader, limit))
    if not samples:
        raise InputError(f"{path}: no samples (every line is empty or a comment)")
    return samples


def load_samples(model, path, *, batch_axis: int | None = 0, limit: int | None = None):
    """Samples for `model` from `path`, through the embedded tokenizer if there is one
    (`batch_axis` and `limit` as for `read_samples`)."""
    text_reader = None
    if "tokenizer" in model.metadata:
        from .text import text_reader_for

        text_reader = text_reader_for(model)
    samples = read_samples(path, model.inputs, text_reader, batch_axis=batch_axis, limit=limit)
    if input_specs(model.metadata):
        for sample in samples:
            sample.feeds = quantize_feeds(model, sample.feeds)
    return samples
