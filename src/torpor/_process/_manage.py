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
from .._images._store import check_name
from . import _keeper, _registry
from ._registry import ManagedProcess


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PermissionDeniedError(
            f"{what} needs root (CRIU and PID namespaces)", hint="run as root"
        )


def run(
    command: Sequence[str],
    *,
    name: str,
    log: Path | bool | None = True,
    rename_taken: bool = False,
) -> ManagedProcess:
    """Start ``command`` so it can be checkpointed and restored cleanly, any number of times:
    pid 1 of its own PID namespace, session leader, stdin on /dev/null, stdout/stderr appended
    to ``log`` (default ``<home>/logs/NAME.log``; ``False`` for /dev/null), no inherited fds.

    ``name`` is reserved before anything starts (:func:`_registry.reserve`): a name another
    command is starting, or whose process runs, is refused, or, with ``rename_taken`` (an
    automatic name), replaced by a fresh one. The record is written once the command runs;
    a command that cannot be started leaves none."""
    _need_root("torpor run")
    if not command:
        raise UsageError("no command given", hint="torpor run [--name N] -- CMD [ARGS...]")
    check_name(name, what="process name")
    chosen = None if log is True or log is False or log is None else Path(log).absolute()

    def work(k: _keeper.Keeper) -> list[ManagedProcess]:
        with _registry.reserve([name], rename_taken=rename_taken) as held:
            final = held.names[0]
            log_path = _paths.logs_dir() / f"{final}.log" if log is True else chosen
            return k.record([k.launch(command, final, log_path)], held)

    return _keeper.spawn(work)[0]


def restore(
    image: Image,
    *,
    names: Sequence[str],
    tcp_established: bool | None = None,
    verify: bool | Literal["full"] = True,
    tcp_close: bool = False,
    reuseport: bool | None = None,
    rename_taken: bool = False,
    lazy: bool = False,
    stopped: bool = False,
) -> list[ManagedProcess]:
    """Restore ``len(names)`` concurrent copies of ``image``, each a running managed process
    writing its stdout/stderr to a log of its own (``<home>/logs/NAME.log``) when the image's
    went to a file.

    All or nothing: if one copy fails, none is left running, and none is recorded (each
    copy's record is written, marked ``restoring``, before it first runs, and removed if the
    restore fails: see ``Keeper.restore``). The
    image's checksums are verified before any restored task runs: ``True`` re-hashes only
    files changed since they were last hashed, ``"full"`` re-hashes everything, ``False``
    skips verification. ``names`` are reserved as :func:`run` reserves its name (a taken one
    replaced by a fresh one with ``rename_taken``).

    ``tcp_close`` restores established TCP connections closed (instead of resumed), so an
    image that held one restores again and as copies. Listening sockets of several copies
    share their port (``reuseport``: see :class:`torpor._process._copies.Copies`).

    ``stopped`` leaves the copies stopped (their records say so until continued with
    :func:`torpor._process._keeper.continue_tree`): a migration's fence.

    ``lazy`` restores memory post-copy: each copy resumes before its pages are in, a daemon of
    its own bringing them (see :mod:`torpor._lazy._restore`; the same verification first).
    """
    _need_root("torpor restore")
    for n in names:
        check_name(n, what="process name")
    m = image.manifest
    if tcp_close:
        tcp_established = False  # nothing to resume: the connections come back closed
    options = RestoreOptions(
        tcp_established=m.tcp_established if tcp_established is None else tcp_established,
        shell_job=m.shell_job,
        tcp_close=tcp_close,
        lazy_pages=lazy,
    )

    def work(k: _keeper.Keeper) -> list[ManagedProcess]:
        with _registry.reserve(names, rename_taken=rename_taken) as held:
            restored = k.restore(
                image,
                held.names,
                options,
                verify=verify,
                reuseport=reuseport,
                reservation=held,
                stay_stopped=stopped,
            )
            return k.record(restored, held)

    return _keeper.spawn(work)
