"""A progress line on a terminal for the tools' long loops (ppl.py, kvdump.py).

One line on stderr, redrawn in place with "\\r" at most every 0.2 s (the
first update at once):

    "  WHAT: DONE/TOTAL UNIT (P%), RATE UNIT/s, ETA M:SS"

the rate being the units done since the Progress was made over the seconds
since, and the ETA what is left at that rate ("ETA -:--" until there is a
rate); it ends as the C commands' line does (client/progress.h). The line is
kept to the terminal's width, so "\\r" always gets back to its start: WHAT is
shortened ("...") first, so the figures stay. clear() or close() erases it,
so what is printed next starts on a clean line.

Only on a terminal: when stderr is not one (a pipe, a file, a CI log, a
script reading JSON) every call does nothing and not a byte is written.
No dependencies beyond the standard library.

    progress = Progress("layers")
    for i in range(n):
        progress.update(i, n, f"training {spec}")
        ...
    progress.close()
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

PERIOD_S = 0.2


def format_eta(seconds: float | None) -> str:
    """M:SS, or H:MM:SS from an hour on; -:-- when unknown."""
    if seconds is None or not seconds >= 0:
        return "-:--"
    s = int(min(seconds, 359999) + 0.5)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def format_rate(rate: float) -> str:
    """12,345 from 100 on, else 12.3 or 1.23."""
    if rate >= 100:
        return f"{int(rate + 0.5):,}"
    return f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}"


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Progress:
    """The progress line of one loop, counted in unit ("layers", "runs")."""

    def __init__(self, unit: str, stream: TextIO | None = None):
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = is_terminal(self.stream)
        self.start = time.monotonic()
        self.last: float | None = None  # when a line was last drawn; None: none is
        self.width = 0

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (AttributeError, ValueError, OSError):
            return 80

    def update(self, done: int, total: int, what: str) -> None:
        """done of total units are done; what says what the loop is on."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self.last is not None and now - self.last < PERIOD_S:
            return
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = format_eta((total - done) / rate if rate > 0 and total >= done else None)
        pct = 100.0 * done / total if total > 0 else 0.0
        head = f"  {what}"
        tail = f": {done:,}/{total:,} {self.unit} ({pct:.0f}%), {format_rate(rate)} {self.unit}/s, ETA {eta}"
        # Past the last column the terminal wraps, and "\r" would go back to
        # the start of the wrapped part only: keep to one row, shortening
        # what before the figures.
        room = self._columns() - 1
        if len(head) + len(tail) > room and room - len(tail) >= 6:
            head = head[: room - len(tail) - 3] + "..."
        line = (head + tail)[:room]
        self.stream.write("\r" + line + " " * max(0, self.width - len(line)))
        self.stream.flush()
        self.width = len(line)
        self.last = now

    def clear(self) -> None:
        """Erases the line, if one is drawn; the next update draws again at once."""
        if self.enabled and self.last is not None:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
        self.last = None
        self.width = 0

    def close(self) -> None:
        """Erases the line; the loop is over."""
        self.clear()
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
