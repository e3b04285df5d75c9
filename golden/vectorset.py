"""A golden vector set on disk: a folder of per-sample tensor files and `manifest.json`.

    DIR/manifest.json
    DIR/sample0000/<tensor>.npy          always (what `refsim check` compares against)
    DIR/sample0000/<tensor>.memh         with target memh
    DIR/sample0000/golden_sample0000.h   with target c
    DIR/sample0000/ita/<block>/...       with target ita

The whole set is written into a temporary folder beside DIR and renamed into place only
when complete, so DIR is either absent or whole: an interrupted run (an error, Ctrl-C, a
kill) never leaves a partial DIR. Replacing a set (`force`) exchanges the two folders in
one atomic rename where the system can (Linux), else moves the old set aside first, and
the next run puts it back if the new one never arrived. Temporary folders carry their
writer's pid, so the next run also removes those a killed writer left behind. Every file's path passes through `_checked_relpath`, and
every name that comes from the model goes through `refsim.golden.names` first, so no file
is ever written outside the temporary folder.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..engine import Model
from ..errors import InputError, RefsimError, internal_error
from ..inputs import Sample
from ..ir import Graph
from .capture import CapturedSample, capture
from .names import FileNames

FORMAT = "refsim.golden"
VERSION = 1
MANIFEST = "manifest.json"
LAYOUT = "row-major (C order): the last index varies fastest"
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


class VectorSetError(RefsimError):
    """A vector set cannot be written or read as asked."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def npy_bytes(array: np.ndarray) -> memoryview:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, order="C"), allow_pickle=False)  # ascontiguousarray would make 0-d arrays 1-d
    return buffer.getbuffer()


def sample_dir(index: int) -> str:
    return f"sample{index:04d}"


def _checked_relpath(relpath: str) -> str:
    """A relative path made only of safe components: never absolute, never '..'."""
    parts = relpath.split("/")
    for part in parts:
        if not _SAFE_COMPONENT.match(part):
            raise internal_error(f"unsafe path component {part!r} in {relpath!r}")
    return relpath


def is_vector_set(path: Path) -> bool:
    try:
        with open(path / MANIFEST, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _owner_tag() -> str:
    """This process, as it appears in the names of its temporary folders: pid-hosthash."""
    return f"{os.getpid()}-{zlib.crc32(socket.gethostname().encode()):08x}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _clean_stale(final: Path) -> None:
    """Remove the temporary folders of writers to `final` that died (kill -9, power loss).

    `.NAME.<pid>-<host>.<random>.partial` is a set being written, `.old` the previous set
    moved aside by a replacing run that did not use the atomic exchange. Only folders of
    this host whose process is gone are touched; an `.old` set whose replacement never
    arrived is put back at `final` first.
    """
    host = _owner_tag().split("-")[1]
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(\d+)-({host})\.[A-Za-z0-9_]+\.(partial|old)$")
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        moved_aside = entry / "set"
        if match.group(3) == "old" and is_vector_set(moved_aside) and not (final.exists() or final.is_symlink()):
            os.replace(moved_aside, final)
        shutil.rmtree(entry, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    False where the system or file system cannot (then the caller renames twice)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


class _Writer:
    """Files go into a temporary folder beside DIR, which `commit` renames into place."""

    def __init__(self, out_dir: str | os.PathLike, force: bool):
        self.final = Path(out_dir)
        _clean_stale(self.final)
        if self.final.exists() or self.final.is_symlink():
            if not force:
                raise VectorSetError(f"{self.final}: already exists; give --force to replace it")
            if not self.final.is_dir() or self.final.is_symlink() or (any(self.final.iterdir()) and not is_vector_set(self.final)):
                raise VectorSetError(
                    f"{self.final}: is not a refsim vector set (no {MANIFEST}); refusing to replace it even with --force"
                )
        parent = self.final.parent
        if not parent.is_dir():
            raise VectorSetError(f"{parent}: no such folder for the vector set")
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.{_owner_tag()}.", suffix=".partial", dir=parent))
        self.files: list[dict[str, Any]] = []

    def write(self, relpath: str, data, **about) -> dict[str, Any]:
        relpath = _checked_relpath(relpath)
        path = self.tmp / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        view = memoryview(data)
        with open(path, "xb") as f:  # "x": a second write to one path is a bug, not an overwrite
            f.write(view)
        entry = {"path": relpath, "sha256": hashlib.sha256(view).hexdigest(), "bytes": view.nbytes, **about}
        self.files.append(entry)
        return entry

    def commit(self, manifest: dict[str, Any]) -> None:
        data = json.dumps(manifest, indent=1, allow_nan=False).encode() + b"\n"
        with open(self.tmp / MANIFEST, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkdtemp makes the folder private (0700); a vector set is meant to be shared.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        if not self.final.exists():
            os.replace(self.tmp, self.final)
        elif _exchange(self.tmp, self.final):  # DIR holds the new set at every instant
            shutil.rmtree(self.tmp, ignore_errors=True)  # now the old set
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.{_owner_tag()}.", suffix=".old", dir=self.final.parent))
            os.replace(self.final, old / "set")
            os.replace(self.tmp, self.final)  # killed just before: the next run puts the old set back
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class SampleContext:
    """What a target sees for one sample: the graph, the captured tensors, a file sink."""

    graph: Graph
    sample: CapturedSample
    selected: list[str]  # tensors chosen by --tensors, in capture order
    options: dict[str, Any]
    file_name: Callable[[str], str]  # tensor name -> safe file stem, unique in the set
    _writer: _Writer
    _target: str
    _tensor_files: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def dir(self) -> str:
        return sample_dir(self.sample.index)

    def emit(self, relpath: str, data, tensor: str | None = None) -> None:
        """Write `data` at `relpath` (safe components joined by '/') inside this sample's folder."""
        entry = self._writer.write(f"{self.dir}/{relpath}", data, target=self._target, sample=self.sample.index)
        if tensor is not None:
            entry["tensor"] = tensor
            self._tensor_files.setdefault(tensor, []).append(entry)


def _quant_entry(t) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if t.scale is not None:
        out["scale"] = np.asarray(t.scale, dtype=float).tolist()
    if t.zero_point is not None:
        out["zero_point"] = np.asarray(t.zero_point).astype(int).tolist()
    if t.quant_axis is not None:
        out["quant_axis"] = int(t.quant_axis)
    return out


INLINE_VALUES = 16  # constants up to this many elements are written into the manifest too


def _json_value(value):
    """Node attributes as JSON: NumPy scalars and arrays become numbers and lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value


class _Constants:
    """Constant inputs of the recorded nodes, each written once as constants/<name>.npy."""

    def __init__(self, writer: "_Writer", graph: Graph):
        self.writer, self.graph = writer, graph
        self.names = FileNames()
        self.written: dict[str, str] = {}

    def describe(self, name: str) -> dict[str, Any]:
        if not name:
            return {"name": None}
        t = self.graph.tensors[name]
        entry: dict[str, Any] = {"name": name, "dtype": t.dtype.name, "shape": list(t.shape)}
        if not t.is_const:
            return {**entry, "const": False}
        if name not in self.written:
            relpath = f"constants/{self.names(name)}.npy"
            self.writer.write(relpath, npy_bytes(np.asarray(t.data).astype(t.dtype.storage)), target="constants", tensor=name)
            self.written[name] = relpath
        entry.update(const=True, file=self.written[name], **_quant_entry(t))
        if t.data.size <= INLINE_VALUES:
            entry["value"] = np.asarray(t.data).tolist()
        return entry


def _tensor_entry(graph: Graph, name: str, producer, file_stem: str, constants: "_Constants") -> dict[str, Any]:
    t = graph.tensors[name]
    kind = "input" if name in graph.inputs else ("output" if name in graph.outputs else "intermediate")
    entry = {
        "name": name,
        "file": file_stem,
        "kind": kind,
        "node": producer.name if producer is not None else None,
        "op": producer.op if producer is not None else None,
        **({} if producer is None else {
            "attrs": _json_value(dict(producer.attrs)),
            "inputs": [constants.describe(i) for i in producer.inputs],
            "outputs": list(producer.outputs),
        }),
        "dtype": t.dtype.name,
        "bits": t.dtype.bits,
        "signed": t.dtype.signed,
        "declared_shape": list(t.shape),
        "layout": LAYOUT,
        **_quant_entry(t),
        "files": [],
    }
    return entry


def _source_hash(path: str | None, samples: list[Sample]) -> dict[str, Any]:
    if path and path != "-" and os.path.isfile(path):
        return {"path": os.fspath(path), "sha256": sha256_file(path)}
    digest = hashlib.sha256()
    for s in samples:
        for name in sorted(s.feeds):
            array = np.ascontiguousarray(s.feeds[name])
            digest.update(f"{name}:{array.dtype.str}:{list(array.shape)};".encode())
            digest.update(array.tobytes())
    return {"path": path, "sha256": digest.hexdigest(), "hashed": "the sample arrays"}


def write_vector_set(
    model: Model,
    samples: list[Sample],
    out_dir: str | os.PathLike,
    targets: dict[str, Any],
    options: dict[str, Any] | None = None,
    wanted: Callable[[str], bool] | None = None,
    force: bool = False,
    model_path: str | None = None,
    inputs_path: str | None = None,
    max_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run `model` on every sample and write the vector set; returns its manifest.

    `targets` maps a target name to its module (see `refsim.hw_vectors`); each module's
    `write(ctx)` is called once per sample. The `npy` target is what `refsim check` reads.
    The size of the whole set is estimated from the first sample's files (samples of one
    model write files of one size unless their shapes differ); over `max_bytes` the set is
    refused before any further sample runs, and nothing is left behind. `progress(n)` is
    called after each sample with the number of samples done so far.
    """
    options = dict(options or {})
    wanted = wanted or (lambda name: True)
    if not samples:
        raise InputError("no samples to run")
    for module in targets.values():
        check = getattr(module, "check", None)
        if check is not None:
            check(model.graph, options)
    capture_all = any(getattr(m, "NEEDS_ALL_TENSORS", False) for m in targets.values())
    writer = _Writer(out_dir, force)
    try:
        file_names = FileNames()
        constants = _Constants(writer, model.graph)
        tensors: dict[str, dict[str, Any]] = {}
        sample_entries = []
        for index, sample in enumerate(samples):
            captured = capture(model, sample, index, None if capture_all else wanted)
            selected = [n for n in captured.arrays if wanted(n)]
            for name in selected:
                if name not in tensors:
                    tensors[name] = _tensor_entry(model.graph, name, captured.producers.get(name), file_names(name), constants)
            files_by_tensor: dict[str, list[dict]] = {}
            for target_name, module in targets.items():
                ctx = SampleContext(model.graph, captured, selected, options, file_names, writer, target_name, files_by_tensor)
                module.write(ctx)
            for name, entries in files_by_tensor.items():
                for e in entries:
                    e["shape"] = list(captured.arrays[name].shape)
                tensors[name]["files"].extend(entries)
            entry = {"index": index, "dir": sample_dir(index), "source": sample.source}
            if sample.text is not None:
                entry["text"] = sample.text
            sample_entries.append(entry)
            del captured
            if index == 0:
                estimate = _estimate_bytes(writer.files, len(samples))
                if max_bytes is not None and estimate > max_bytes:
                    first = sum(f["bytes"] for f in writer.files if "sample" in f)
                    raise VectorSetError(
                        f"{writer.final}: the vector set would take about {format_size(estimate)} ({len(samples)} samples of "
                        f"{format_size(first)} each, measured on the first), over the limit of {format_size(max_bytes)}; "
                        "select tensors (--tensors), fewer samples (--samples) or raise the limit (--max-size)"
                    )
            if progress is not None:
                progress(index + 1)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "refsim_version": __version__,
            "model": {
                "name": model.graph.name,
                **({"path": os.fspath(model_path), "sha256": sha256_file(model_path)} if model_path else {}),
            },
            "inputs": _source_hash(inputs_path, samples),
            "targets": {
                name: (module.describe(options) if hasattr(module, "describe") else {}) for name, module in targets.items()
            },
            "samples": sample_entries,
            "tensors": list(tensors.values()),
            "files": writer.files,
        }
        writer.commit(manifest)
        return manifest
    except BaseException:
        writer.abort()
        raise


def _estimate_bytes(files: list[dict[str, Any]], n_samples: int) -> int:
    per_sample = sum(f["bytes"] for f in files if "sample" in f)
    return per_sample * n_samples + sum(f["bytes"] for f in files if "sample" not in f)


def format_size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def parse_size(text: str) -> int | None:
    """'4G', '500M', '10k', '123' (bytes) or 'none' (no limit) as a number of bytes."""
    value = str(text).strip().lower()
    if value in ("none", "0", "off"):
        return None
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    number = value.rstrip("b")
    factor = 1
    if number and number[-1] in scale:
        factor, number = scale[number[-1]], number[:-1]
    try:
        size = float(number) * factor
    except ValueError:
        raise InputError(f"size {text!r} is not a number of bytes such as 500M, 4G or none") from None
    if size < 0:
        raise InputError(f"size {text!r} is negative")
    return int(size)


def load_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check DIR/manifest.json."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise VectorSetError(f"{directory}: no such vector set folder")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise VectorSetError(f"{directory}: not a vector set (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise VectorSetError(f"{path}: cannot read: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise VectorSetError(f"{path}: not a refsim vector set manifest")
    if manifest.get("version") != VERSION:
        raise VectorSetError(f"{path}: vector set version {manifest.get('version')!r}; this refsim reads version {VERSION}")
    for f in manifest.get("files", []):
        _checked_manifest_path(path, f.get("path", ""))
    return manifest


def _checked_manifest_path(manifest_path, relpath: str) -> None:
    """A manifest is data from disk: its paths must be as safe as the ones we write."""
    if not isinstance(relpath, str) or not all(_SAFE_COMPONENT.match(p) for p in relpath.split("/")):
        raise VectorSetError(f"{manifest_path}: unsafe file path {relpath!r} in the manifest")
