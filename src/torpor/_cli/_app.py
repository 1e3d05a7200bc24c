"""The CLI's application object: output, tables, JSON, progress, and the error boundary.

Expected failures (any :class:`~torpor.TorporError`) end with one line on stderr and exit code 1;
anything else prints a traceback only when ``TORPOR_DEBUG`` is set. Diagnostics go to stderr,
results to stdout. ``NO_COLOR`` and non-terminals get plain output; ``-q`` silences progress.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO


class App:
    """One per CLI invocation: where output goes and how verbose it is."""

    def __init__(
        self,
        *,
        verbosity: int = 0,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.verbosity = verbosity
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.color = (
            "NO_COLOR" not in os.environ and os.environ.get("CI") != "true" and self.stderr.isatty()
        )

    def out(self, text: str = "") -> None:
        """A line of results on stdout."""
        print(text, file=self.stdout, flush=True)

    def err(self, text: str) -> None:
        """A diagnostic line on stderr, each of its lines with its non-printable characters
        escaped: an error may carry a peer's words (a migration target's refusal), and those
        must not drive the operator's terminal."""
        print("\n".join(map(_printable, text.split("\n"))), file=self.stderr, flush=True)

    def info(self, text: str) -> None:
        """A progress note on stderr, hidden by ``-q``."""
        if self.verbosity >= 0:
            self.err(text)

    def debug(self, text: str) -> None:
        """A detail on stderr, shown with ``-v``."""
        if self.verbosity > 0:
            self.err(text)

    def warn(self, text: str) -> None:
        """A warning on stderr."""
        self.err(f"torpor: warning: {text}")

    def json(self, obj: Any) -> None:
        """Results as indented JSON on stdout."""
        self.out(json.dumps(obj, indent=2, sort_keys=True, default=str))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Results as an aligned text table on stdout."""
        self.out(format_table(headers, rows))

    @contextmanager
    def progress(self, label: str, total: int | None) -> Iterator[Progress]:
        """A progress bar on stderr (only on a terminal and without ``-q``)."""
        bar = Progress(label, total, self.stderr, enabled=self.verbosity >= 0)
        try:
            yield bar
        finally:
            bar.close()


class Progress:
    """A byte-count progress bar; redraws at most 10 times a second."""

    def __init__(self, label: str, total: int | None, stream: TextIO, *, enabled: bool) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self._started = time.monotonic()
        self._last = 0.0

    def advance(self, n: int) -> None:
        """Record ``n`` more bytes done."""
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.1:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self._started, 1e-6)
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = int(frac * 30)
            bar = "#" * filled + "-" * (30 - filled)
            text = (
                f"\r{self.label} [{bar}] {frac:6.1%} {human_bytes(self.done)} {human_bytes(rate)}/s"
            )
        else:
            text = f"\r{self.label} {human_bytes(self.done)} {human_bytes(rate)}/s"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        """Finish the bar (a final redraw and a newline)."""
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``3725`` → ``1h02m``."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned plain-text table. Cells come from outside (command lines, names, paths), so
    control characters are shown escaped: a terminal never receives an escape sequence from a
    process's command line."""
    cells = [[_printable(str(h)) for h in headers]] + [
        ["" if c is None else _printable(str(c)) for c in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\u2028``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
