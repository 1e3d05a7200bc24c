"""Where torpor keeps its state: one home directory, laid out here and nowhere else.

``TORPOR_HOME`` overrides the default (``/var/lib/torpor`` for root, else
``$XDG_DATA_HOME/torpor``). Everything is created readable by its owner only: images hold a
process's memory, secrets included.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The torpor home directory (created 0700 on first use)."""
    env = os.environ.get("TORPOR_HOME")
    if env:
        path = Path(env)
    elif os.geteuid() == 0:
        path = Path("/var/lib/torpor")
    else:
        xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        path = Path(xdg) / "torpor"
    return private_dir(path)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if missing, mode 0700; return it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename (or a creation) in the directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def images_dir() -> Path:
    """Local image directories (``torpor checkpoint`` without ``-o`` or ``--pool``)."""
    return private_dir(home() / "images")


def procs_dir() -> Path:
    """Records of managed processes (``torpor run`` / ``torpor restore``)."""
    return private_dir(home() / "procs")


def logs_dir() -> Path:
    """CRIU logs and the stdout/stderr logs of managed processes."""
    return private_dir(home() / "logs")


def pools_dir() -> Path:
    """Pool configurations and the ``default`` dir pool's data."""
    return private_dir(home() / "pools")


def cache_dir() -> Path:
    """Images materialised from pools for restore."""
    return private_dir(home() / "cache")
