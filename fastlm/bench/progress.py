"""A dependency-free progress bar on stderr (one line per step when stderr is not a terminal)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, stream=None, width: int = 28, enabled: bool = True):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.label = ""

    def _line(self, extra: str = "") -> str:
        frac = self.done / self.total
        fill = int(frac * self.width)
        elapsed = time.perf_counter() - self.t0
        eta = f" eta {elapsed / frac - elapsed:4.0f}s" if 0 < frac < 1 else ""
        return (f"[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} "
                f"{elapsed:5.0f}s{eta} {self.label}{(' ' + extra) if extra else ''}")

    def start(self, label: str) -> None:
        self.label = label
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + self._line()[:200])
        else:
            self.stream.write(self._line() + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K" + self._line(text)[:200])
            self.stream.flush()

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        if not self.enabled:
            return
        self.label = "done"
        self.stream.write(("\r\033[K" if self.tty else "") + self._line() + "\n")
        self.stream.flush()

    def log(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()
