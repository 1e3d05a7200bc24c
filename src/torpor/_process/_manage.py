"""Starting and restoring managed processes (the contract the CLI and the API use)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from .. import _paths
from .._engine import RestoreOptions
from .._errors import PermissionDeniedError, UsageError
from .._images._image import Image
from . import _keeper, _registry
from ._registry import ManagedProcess


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PermissionDeniedError(
            f"{what} needs root (CRIU and PID namespaces)", hint="run as root"
        )


def run(command: Sequence[str], *, name: str, log: Path | bool | None = True) -> ManagedProcess:
    """Start ``command`` so it can be checkpointed and restored cleanly, any number of times:
    pid 1 of its own PID namespace, session leader, stdin on /dev/null, stdout/stderr appended
    to ``log`` (default ``<home>/logs/NAME.log``; ``False`` for /dev/null), no inherited fds."""
    _need_root("torpor run")
    if not command:
        raise UsageError("no command given", hint="torpor run [--name N] -- CMD [ARGS...]")
    _registry.reserve(name)
    log_path: Path | None
    if log is True:
        log_path = _paths.logs_dir() / f"{name}.log"
    elif log is False or log is None:
        log_path = None
    else:
        log_path = Path(log).absolute()
    return _keeper.spawn(lambda k: [k.launch(command, name, log_path)])[0]


def restore(
    image: Image,
    *,
    names: Sequence[str],
    tcp_established: bool | None = None,
    verify: bool | Literal["full"] = True,
    tcp_close: bool = False,
    reuseport: bool | None = None,
) -> list[ManagedProcess]:
    """Restore ``len(names)`` concurrent copies of ``image``, each a running managed process.

    All or nothing: if one copy fails, none is left running. The image's checksums are verified
    before any restored task runs: ``True`` re-hashes only files changed since they were last
    hashed, ``"full"`` re-hashes everything, ``False`` skips verification.

    ``tcp_close`` restores established TCP connections closed (instead of resumed), so an
    image that held one restores again and as copies. Listening sockets of several copies
    share their port (``reuseport``: see :class:`torpor._process._copies.Copies`).
    """
    _need_root("torpor restore")
    for n in names:
        _registry.reserve(n)
    m = image.manifest
    if tcp_close:
        tcp_established = False  # nothing to resume: the connections come back closed
    options = RestoreOptions(
        tcp_established=m.tcp_established if tcp_established is None else tcp_established,
        shell_job=m.shell_job,
        tcp_close=tcp_close,
    )
    return _keeper.spawn(
        lambda k: k.restore(image, names, options, verify=verify, reuseport=reuseport)
    )
