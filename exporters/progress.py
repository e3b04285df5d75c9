"""Progress bars on stderr (tqdm), drawn only when stderr is a terminal: logs and pipes
stay clean. `Progress(enabled)(done, total, what)` after each step; a new `what` starts a
new bar."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._what = None
        self._bar = None

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.enabled:
            return
        if what != self._what or self._bar is None or self._bar.total != total:
            self.close()
            self._what = what
            self._bar = tqdm(total=total, desc=what, file=self.stream, leave=True, dynamic_ncols=True)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
