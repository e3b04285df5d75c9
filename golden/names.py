"""Safe file names and C identifiers for names that come from a model.

A tensor or block name is whatever the model's author (or an ONNX exporter) wrote: it may
hold '/', '..', NUL, drive letters, thousands of characters, or differ from another name
only by letter case. None of that may reach the file system as written. `FileNames` maps
each name to one path component that

- holds only ASCII letters, digits, '.', '_' and '-', never starts with '.' and is never
  empty, so it cannot name a parent, a hidden file, an absolute path or another folder;
- is at most `MAX_STEM` characters long;
- is unique among all names of the set even on a case-insensitive file system, and
  avoids the device names Windows reserves (CON, NUL, COM1, ...).

A name that had to be changed (or that collides once case is ignored) gets a suffix made
from the SHA-256 of the original name, so the mapping is deterministic and distinct names
stay distinct. The manifest records the mapping; nothing needs to invert it.
"""

from __future__ import annotations

import hashlib
import re

MAX_STEM = 96
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10)}


def _digest(name: str, length: int = 10) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def _plain(name: str) -> str:
    """The name with every unsafe character replaced, leading dots removed, length capped."""
    stem = _UNSAFE.sub("_", name).lstrip(".")
    return stem[:MAX_STEM] or "_"


def _is_reserved(stem: str) -> bool:
    return stem.split(".")[0].upper() in _WINDOWS_RESERVED


def _with_digest(name: str, stem: str) -> str:
    return f"{stem[: MAX_STEM - 11]}-{_digest(name)}"


class FileNames:
    """Assigns each name a safe, unique (case-insensitively) path component."""

    def __init__(self):
        self._by_name: dict[str, str] = {}
        self._taken: set[str] = set()

    def __call__(self, name: str) -> str:
        if name in self._by_name:
            return self._by_name[name]
        stem = _plain(name)
        if stem != name or _is_reserved(stem):
            stem = _with_digest(name, stem)
        if stem.casefold() in self._taken:
            stem = _with_digest(name, _plain(name))
        counter = 1
        base = stem
        while stem.casefold() in self._taken:  # only if two digests collide as well
            counter += 1
            stem = f"{base}-{counter}"
        self._taken.add(stem.casefold())
        self._by_name[name] = stem
        return stem


def safe_component(name: str) -> str:
    """One safe path component for a single name (no uniqueness bookkeeping)."""
    return FileNames()(name)
