"""Timestamps of a lazy restore's steps, for measuring where its time goes.

Off unless ``TORPOR_LAZY_TRACE`` names a file: each :func:`mark` then appends one line
``<unix time> <pid> <step>`` to it (``O_APPEND``: the command, the keeper and its threads write
to the same file without mixing lines). ``bench/bench_lazy_parts.py`` reads it. A failure to
write costs the line, never the restore.
"""

from __future__ import annotations

import contextlib
import os
import time

ENV = "TORPOR_LAZY_TRACE"


def mark(step: str) -> None:
    """Note that ``step`` happened now (if tracing is on)."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = f"{time.time():.6f} {os.getpid()} {step}\n".encode()
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
