"""Comparing a dump (from hardware or another simulator) with a golden vector set.

The dump mirrors the set's layout: for tensor file `sample0000/fc1.out.npy` in the set,
the dump holds `sample0000/fc1.out.npy` (any integer dtype, same shape) or
`sample0000/fc1.out.memh` (`$readmemh` words as the memh target writes them). For each
tensor and sample the result is `match`, `mismatch` (with the number of differing values,
the first one's index, expected and actual value, and the largest difference), or
`missing` (the dump has no file for it). `atol` tolerates differences up to that size.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InputError
from ..npyfile import read_npy
from .vectorset import VectorSetError, load_manifest, sha256_file


@dataclass
class TensorResult:
    tensor: str
    sample: int
    status: str  # "match" | "mismatch" | "missing"
    dtype: str
    shape: list[int]
    dump_file: str | None = None
    mismatches: int = 0
    first_index: list[int] | None = None
    expected: int | None = None
    actual: int | None = None
    max_abs_diff: int = 0
    reason: str | None = None  # for a mismatch of form rather than of values


@dataclass
class CheckReport:
    golden: str
    dump: str
    atol: int
    results: list[TensorResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.status == "match" for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {
            "golden": self.golden,
            "dump": self.dump,
            "atol": self.atol,
            "ok": self.ok,
            "matched": self.count("match"),
            "mismatched": self.count("mismatch"),
            "missing": self.count("missing"),
            "results": [{k: v for k, v in asdict(r).items() if v is not None} for r in self.results],
        }


def _exact_difference(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """|actual - expected| without overflow: int64 when both stay within 62 bits, else Python ints."""
    def small(a):
        return a.size == 0 or (int(a.min()) >= -(1 << 62) and int(a.max()) < (1 << 62))

    if small(expected) and small(actual):
        return np.abs(actual.astype(np.int64) - expected.astype(np.int64))
    return np.abs(actual.astype(object) - expected.astype(object))


def compare_values(expected: np.ndarray, actual: np.ndarray, atol: int) -> tuple[int, list[int] | None, int, int | None, int | None]:
    """(mismatch count, first mismatching index, largest |difference|, expected, actual there)."""
    diff = _exact_difference(expected, actual)
    bad = np.asarray(diff > atol, dtype=bool)
    count = int(np.count_nonzero(bad))
    largest = int(diff.max()) if diff.size else 0
    if not count:
        return 0, None, largest, None, None
    flat = int(np.argmax(bad.reshape(-1)))
    index = [int(i) for i in np.unravel_index(flat, expected.shape)]
    return count, index, largest, int(expected.reshape(-1)[flat]), int(actual.reshape(-1)[flat])


def _load_npy(path: Path) -> np.ndarray:
    return read_npy(os.fspath(path))


def _golden_array(root: Path, entry: dict[str, Any]) -> np.ndarray:
    path = root / entry["path"]
    if not path.is_file():
        raise VectorSetError(f"{path}: listed in the manifest but missing from the vector set")
    if sha256_file(path) != entry.get("sha256"):
        raise VectorSetError(f"{path}: its SHA-256 differs from the manifest (the vector set was modified)")
    return _load_npy(path)


def _check_one(name: str, info: dict, entry: dict, expected: np.ndarray, dump: Path, atol: int, word_bits: int) -> TensorResult:
    from . import memh

    result = TensorResult(name, entry["sample"], "missing", info["dtype"], list(expected.shape))
    stem = entry["path"][: -len(".npy")]
    npy, hexfile = dump / f"{stem}.npy", dump / f"{stem}.memh"
    if npy.is_file():
        result.dump_file = os.fspath(npy)
        actual = _load_npy(npy)
        if actual.dtype.kind not in "iub":
            result.status, result.reason = "mismatch", f"dump holds {actual.dtype} values, not integers"
            return result
        if actual.shape != expected.shape:
            result.status, result.reason = "mismatch", f"dump has shape {list(actual.shape)}, expected {list(expected.shape)}"
            return result
    elif hexfile.is_file():
        result.dump_file = os.fspath(hexfile)
        actual, words = memh.read_values(hexfile, info["dtype"], expected.size, word_bits)
        needed = memh.words_needed(expected.size, info["bits"], word_bits)
        if words != needed:
            result.status, result.reason = "mismatch", f"dump holds {words} {word_bits}-bit words, expected {needed}"
            return result
        actual = actual.reshape(expected.shape)
    else:
        return result
    count, index, largest, exp, act = compare_values(expected, actual, atol)
    result.max_abs_diff = largest
    if count:
        result.status, result.mismatches, result.first_index, result.expected, result.actual = "mismatch", count, index, exp, act
    else:
        result.status = "match"
    return result


def check(golden_dir: str | os.PathLike, dump_dir: str | os.PathLike, wanted: Callable[[str], bool] | None = None,
          atol: int = 0, word_bits: int | None = None) -> CheckReport:
    """Compare every selected tensor of every sample; raises RefsimError for user errors."""
    root, dump = Path(golden_dir), Path(dump_dir)
    manifest = load_manifest(root)
    if not dump.is_dir():
        raise InputError(f"{dump}: no such dump folder")
    if atol < 0:
        raise InputError(f"--atol must be >= 0, got {atol}")
    if word_bits is None:
        word_bits = int(manifest.get("targets", {}).get("memh", {}).get("word_bits", 32))
    wanted = wanted or (lambda name: True)
    report = CheckReport(os.fspath(root), os.fspath(dump), atol)
    selected = [t for t in manifest.get("tensors", []) if wanted(t["name"])]
    if not selected:
        raise InputError(f"{root}: no tensor of the vector set matches --tensors")
    for info in selected:
        for entry in info["files"]:
            if entry.get("target") != "npy":
                continue
            expected = _golden_array(root, entry)
            report.results.append(_check_one(info["name"], info, entry, expected, dump, atol, word_bits))
    report.results.sort(key=lambda r: r.sample)
    return report


SUMMARY_ABOVE = 50  # results; above this, matching tensors are counted, not listed


def format_report(report: CheckReport, matches: bool | None = None) -> str:
    """One line per result, then the totals. `matches`: list matching tensors (True), only
    count them (False), or list them only for sets of at most SUMMARY_ABOVE results (None)."""
    if matches is None:
        matches = len(report.results) <= SUMMARY_ABOVE
    lines = []
    for r in report.results:
        where = f"sample {r.sample} {r.tensor} ({r.dtype}{r.shape})"
        if r.status == "match":
            if matches:
                lines.append(f"match     {where}")
        elif r.status == "missing":
            lines.append(f"MISSING   {where}: no .npy or .memh file in the dump")
        elif r.reason:
            lines.append(f"MISMATCH  {where}: {r.reason}")
        else:
            total = int(np.prod(r.shape)) if r.shape else 1
            lines.append(
                f"MISMATCH  {where}: {r.mismatches} of {total} values differ; first at {r.first_index}: "
                f"expected {r.expected}, got {r.actual}; largest difference {r.max_abs_diff}"
            )
    tolerance = f" (atol {report.atol})" if report.atol else ""
    failed = [r for r in report.results if r.status != "match"]
    if failed:
        # Results are in the set's order, which is execution order: the first is where it diverges.
        first = failed[0]
        lines.append(f"first difference: sample {first.sample} {first.tensor} ({first.status})")
    if not matches and report.count("match"):
        lines.append(f"({report.count('match')} matching tensors not listed; --all lists them)")
    lines.append(
        f"{report.count('match')} match, {report.count('mismatch')} mismatch, {report.count('missing')} missing{tolerance}"
        + (": OK" if report.ok else ": FAILED")
    )
    return "\n".join(lines)
