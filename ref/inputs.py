"""Reading model inputs from files: `.npy`, `.npz`, or text with one sample per line.

Text lines are whitespace- or comma-separated integers for a model with one input; each
line is one sample, shaped to the input's declared shape with a batch of one. Lines that
are empty or start with '#' are skipped. (Models with an embedded tokenizer read raw text
lines instead; see `refsim.text`.) `.npy`/`.npz` files are never unpickled.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .errors import InputError
from .ir import Tensor


@dataclass
class Sample:
    """One set of feeds and where it came from (for messages and file names)."""

    feeds: dict[str, np.ndarray]
    source: str
    text: str | None = None


def _load_array_file(path: str):
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise InputError(f"{path}: cannot read as a NumPy array without unpickling: {e}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None


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


def _parse_numbers(line: str, where: str) -> np.ndarray:
    values = []
    for token in line.replace(",", " ").split():
        try:
            values.append(int(token))  # decimal, leading zeros allowed
        except ValueError:
            try:
                values.append(int(token, 0))  # 0x.., 0b.., 0o..
            except ValueError:
                raise InputError(f"{where}: {token!r} is not an integer") from None
    return np.array(values, dtype=object).astype(np.int64) if values else np.zeros(0, np.int64)


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
        try:
            values = _parse_numbers(text, where)
        except OverflowError:
            raise InputError(f"{where}: a number does not fit 64 bits") from None
        yield Sample({t.name: values.reshape(_sample_shape(t, values.size, where))}, where)


def read_samples(path: str, inputs: list[Tensor], text_reader=None) -> list[Sample]:
    """Samples from an input file; `text_reader(path, lines)` handles raw text lines."""
    if path != "-" and not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if path.endswith(".npy"):
        if len(inputs) != 1:
            raise InputError(f"{path}: the model has {len(inputs)} inputs; give them as an .npz keyed by name")
        return [Sample({inputs[0].name: _load_array_file(path)}, path)]
    if path.endswith(".npz"):
        with _load_array_file(path) as archive:
            return [Sample({k: archive[k] for k in archive.files}, path)]
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
    samples = list(text_reader(path, lines)) if text_reader is not None else list(number_lines(path, inputs, lines))
    if not samples:
        raise InputError(f"{path}: no samples (every line is empty or a comment)")
    return samples


def load_samples(model, path):
    """Samples for `model` from `path`, through the embedded tokenizer if there is one."""
    text_reader = None
    if "tokenizer" in model.metadata:
        from .text import text_reader_for

        text_reader = text_reader_for(model)
    samples = split_fixed_batches(read_samples(path, model.inputs, text_reader), model.inputs)
    from .boundary import input_specs, quantize_feeds

    if input_specs(model.metadata):
        for sample in samples:
            sample.feeds = quantize_feeds(model, sample.feeds)
    return samples


def split_fixed_batches(samples: list[Sample], inputs: list[Tensor]) -> list[Sample]:
    """An array file holding several samples for a model whose inputs declare a fixed batch
    size (a graph exported at batch 1, say) becomes one sample per batch of that size."""
    fixed = {t.name: t.shape[0] for t in inputs if t.shape and isinstance(t.shape[0], int) and t.shape[0] > 0}
    if not fixed or len(fixed) != len(inputs) or len(set(fixed.values())) != 1:
        return samples
    batch = next(iter(fixed.values()))
    out = []
    for sample in samples:
        counts = {np.shape(v)[0] if np.ndim(v) else None for n, v in sample.feeds.items() if n in fixed}
        ranks_match = all(np.ndim(sample.feeds[t.name]) == len(t.shape) for t in inputs if t.name in sample.feeds)
        count = counts.pop() if len(counts) == 1 else None
        if not ranks_match or count is None or count == batch or count % batch:
            out.append(sample)
            continue
        for start in range(0, count, batch):
            feeds = {n: (v[start:start + batch] if n in fixed else v) for n, v in sample.feeds.items()}
            out.append(Sample(feeds, f"{sample.source}[{start}]" if batch == 1 else f"{sample.source}[{start}:{start + batch}]",
                              sample.text))
    return out
