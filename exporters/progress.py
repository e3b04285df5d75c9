"""A tiny progress bar on stderr (no dependency), drawn only when stderr is a terminal:
logs and pipes stay clean."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, enabled: bool = True, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.width = width
        self.interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._what = None
        self._start = time.monotonic()

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.enabled:
            return
        if what != self._what:
            self._what, self._start = what, time.monotonic()
        if not self.interactive:
            return
        filled = int(self.width * done / max(total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{what:<12} [{bar}] {done}/{total}")
        if done >= total:
            self.stream.write(f"  {time.monotonic() - self._start:.1f}s\n")
        self.stream.flush()
