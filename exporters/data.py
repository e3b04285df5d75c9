"""Sample data for calibration and comparison: text lines through a tokenizer, or arrays.

DATA is a text file (one sample per line; empty lines and lines starting with '#' are
skipped) encoded by the tokenizer, an `.npy` file (samples along axis 0, for a model with
one input) or an `.npz` file (one array per model input, samples along axis 0). Arrays are
never unpickled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from refsim.errors import RefsimError
from refsim.npyfile import read_npy, read_npz
from refsim.text import DEFAULT_INPUTS, TextEncoder

from .calibrate import sample_digest
from .dyadic import ExportError


@dataclass
class Dataset:
    """Samples as arrays per model input (samples along axis 0), plus a digest per sample."""

    arrays: dict[str, np.ndarray]
    digests: list[str]
    texts: list[str] | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.digests)

    def batches(self, size: int, dtypes: dict[str, np.dtype] | None = None, exact: bool = False) -> list[dict[str, np.ndarray]]:
        """The samples in runs of `size`; with `exact` (a model with a fixed batch size) a
        last, shorter run is left out."""
        out = []
        for start in range(0, len(self) - (len(self) % size if exact else 0), size):
            batch = {}
            for name, array in self.arrays.items():
                part = array[start:start + size]
                if dtypes and name in dtypes:
                    part = part.astype(dtypes[name])
                batch[name] = part
            out.append(batch)
        return out

    def head(self, count: int) -> "Dataset":
        return Dataset({k: v[:count] for k, v in self.arrays.items()}, self.digests[:count],
                       self.texts[:count] if self.texts else None, self.source)


def read_text_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ExportError(f"{path}: not UTF-8 text (give arrays as .npy or .npz)") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def load_dataset(path: str, input_names: list[str], encoder: TextEncoder | None, mapping: dict[str, str] | None = None) -> Dataset:
    """Read DATA for a model with inputs `input_names`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ExportError(f"{path}: no such file")
    if path.endswith(".npy") or path.endswith(".npz"):
        if path.endswith(".npy"):
            if len(input_names) != 1:
                raise ExportError(f"{path}: the model has {len(input_names)} inputs ({', '.join(input_names)}); give an .npz keyed by input name")
            arrays = {input_names[0]: read_npy(path)}
        else:
            arrays = read_npz(path)
            missing = [n for n in input_names if n not in arrays]
            if missing:
                raise ExportError(f"{path}: no arrays for model input(s) {missing} (it holds {sorted(arrays)})")
            arrays = {n: arrays[n] for n in input_names}
        counts = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
        if len(counts) != 1 or 0 in counts:
            raise ExportError(f"{path}: every array needs the same number (> 0) of samples along axis 0")
        n = counts.pop()
        digests = [sample_digest(np.concatenate([arrays[k][i].reshape(-1).view(np.uint8) for k in input_names]))
                   for i in range(n)]
        return Dataset(arrays, digests, None, path)
    if encoder is None:
        raise ExportError(f"{path}: text data needs a tokenizer (--tokenizer tokenizer.json), or give arrays as .npy/.npz")
    texts = read_text_lines(path)
    if not texts:
        raise ExportError(f"{path}: no samples (empty lines and lines starting with '#' are skipped)")
    mapping = mapping or {n: DEFAULT_INPUTS[n] for n in input_names if n in DEFAULT_INPUTS}
    missing = [n for n in input_names if n not in mapping]
    if missing:
        raise ExportError(f"model input(s) {missing} do not come from a tokenizer (known: {', '.join(DEFAULT_INPUTS)})")
    try:
        encoded = encoder.encode(texts)
    except RefsimError as e:
        raise ExportError(f"{path}: {e}") from None
    arrays = {name: encoded[field] for name, field in mapping.items()}
    return Dataset(arrays, [sample_digest(t) for t in texts], texts, path)


def read_labels(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            labels = [line.strip() for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ExportError(f"{path}: not UTF-8 text") from None
    if not labels:
        raise ExportError(f"{path}: no labels")
    return labels
