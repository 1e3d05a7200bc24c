"""Checkpoint leftovers for tests: a staging directory with CRIU's files, the marks asked for
and (unless told not to) the checkpoint's record (``_images._incomplete.Record``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torpor._images._image import Staging
from torpor._images._incomplete import Record


def record(dest: str = "img", **changes: Any) -> Record:
    """A plausible record of a checkpoint to ``dest``, with ``changes`` applied."""
    fields: dict[str, Any] = {
        "dest": dest,
        "name": dest,
        "pid": 4242,
        "start_time": 99,
        "cmdline": ("python", "app.py"),
        "rss_bytes": 1 << 20,
        "criu_version": "4.2.1",
        "tcp_established": False,
        "shell_job": False,
        "leave_running": False,
        "created": "2026-01-01T00:00:00.000000+00:00",
    }
    fields.update(changes)
    return Record(**fields)


def leftover(
    parent: Path,
    dest: str = "img",
    *,
    marks: tuple[str, ...] = (),
    with_record: bool = True,
    **changes: Any,
) -> Path:
    """A staging directory ``parent/dest`` a checkpoint left: CRIU's files, empty files named
    ``marks`` (``stats-dump``: CRIU's success mark), and its record (``changes`` applied)."""
    st = Staging(parent / dest)
    st.create()
    for name, data in {
        "inventory.img": b"i",
        "pstree.img": b"p",
        "pages-1.img": b"x" * 5000,
    }.items():
        (st.path / name).write_bytes(data)
    for mark in marks:
        (st.path / mark).write_bytes(b"")
    if with_record:
        fd = os.open(st.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            record(dest, **changes).write(fd)
        finally:
            os.close(fd)
    return st.path
