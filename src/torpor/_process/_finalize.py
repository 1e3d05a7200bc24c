"""Finishing a self-dump: the image is staged while the process dumps itself, and whoever
outlives the dump turns it into a complete image.

A self-dumping process writes ``torpor.pending.json`` (what the manifest needs) into the staging
directory before asking CRIU to dump it. CRIU writes ``stats-dump`` only after a successful dump.
Then:

- with ``leave_running`` the original process finalises the image itself;
- without it CRIU kills the process, so the helper that started CRIU for it (the keeper of a
  managed process, or a detached finaliser) finalises once CRIU has exited.

Finalising takes an exclusive lock on the pending file, so it happens exactly once.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._images import _manifest
from .._images._image import Image, Staging

PENDING_NAME = "torpor.pending.json"
SUCCESS_MARK = "stats-dump"


@dataclass(frozen=True)
class Pending:
    """What a self-dump records before it starts."""

    dest: str
    name: str
    pid: int
    cmdline: tuple[str, ...]
    rss_bytes: int
    criu_version: str
    leave_running: bool
    tcp_established: bool = False
    labels: dict[str, str] = field(default_factory=dict)

    def write(self, staging: Path) -> None:
        """Store in the staging directory."""
        data: dict[str, Any] = dict(self.__dict__)
        data["cmdline"] = list(self.cmdline)
        fd = os.open(staging / PENDING_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)

    @classmethod
    def read(cls, staging: Path) -> Pending:
        """Load from the staging directory."""
        data = json.loads((staging / PENDING_NAME).read_text())
        data["cmdline"] = tuple(data["cmdline"])
        return cls(**data)


def finalize(staging: Path) -> Image | None:
    """Turn a successfully dumped staging directory into its image; None if there is nothing
    to do (already finalised, or the dump did not succeed — then the staging is removed unless
    the process may still be using it)."""
    pending_path = staging / PENDING_NAME
    try:
        fd = os.open(pending_path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd) as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if not pending_path.exists() or not staging.exists():
            return None
        pending = Pending.read(staging)
        if not (staging / SUCCESS_MARK).exists():
            return None
        pending_path.unlink()
        st = Staging(Path(pending.dest))
        st.path = staging
        return st.commit(
            lambda files: _manifest.build(
                name=pending.name,
                pid=pending.pid,
                files=files,
                criu_version=pending.criu_version,
                cmdline=pending.cmdline,
                rss_bytes=pending.rss_bytes,
                tcp_established=pending.tcp_established,
                coordinated=True,
                labels=pending.labels,
            )
        )


def finish_after_criu(staging: Path) -> Image | None:
    """What the helper that ran CRIU for a self-dump does once CRIU has exited: finalise the
    image if CRIU killed the process (without ``leave_running`` the process cannot; with it,
    the process finalises itself). None when there is nothing to finalise."""
    try:
        pending = Pending.read(staging)
    except FileNotFoundError:
        return None
    return None if pending.leave_running else finalize(staging)
