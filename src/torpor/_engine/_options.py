"""What a dump or a restore is asked to do and what it gives back, as plain frozen values, and
how those options become the ``Opts`` of a CRIU RPC request (:func:`rpc_opts`). Nothing here
talks to CRIU: the engine (:mod:`._criu`) and a keeper building a dump request for a child
(:func:`._criu.dump_request`) both start from these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .._proto import criu_rpc_pb2 as pb
from ._rpc import NotifyHandler


@dataclass(frozen=True)
class CriuVersion:
    """CRIU's version as reported over RPC."""

    major: int
    minor: int
    sublevel: int = 0
    gitid: str = ""

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.sublevel}" + (
            f" ({self.gitid})" if self.gitid else ""
        )


@dataclass(frozen=True)
class Features:
    """Optional CRIU/kernel features (FEATURE_CHECK)."""

    mem_track: bool
    lazy_pages: bool
    pidfd_store: bool


@dataclass(frozen=True)
class DumpOptions:
    """How to dump. Defaults suit a process started with ``torpor run``."""

    leave_running: bool = False
    tcp_established: bool = False
    shell_job: bool = False
    ext_unix_sk: bool = False
    file_locks: bool = False
    link_remap: bool = False
    external: tuple[str, ...] = ()
    # CRIU's default (errors and warnings, which every failure this engine explains is): -v4's
    # per-VMA and per-page lines are written while the process is frozen, and cost a 100 MiB
    # leave-running dump ~25 ms of freeze (bench/RESULTS-supervise.md, control row).
    log_level: int = 2


@dataclass(frozen=True)
class RestoreOptions:
    """How to restore. ``rst_sibling`` makes the restored root a child of the caller."""

    tcp_established: bool = False
    shell_job: bool = False
    ext_unix_sk: bool = False
    file_locks: bool = False
    rst_sibling: bool = True
    inherit_fds: Mapping[str, int] = field(default_factory=dict)
    external: tuple[str, ...] = ()
    root: str | None = None
    leave_stopped: bool = False
    # Established TCP connections come back closed (CRIU's tcp_close): an image that held one
    # can then be restored again, and as copies, while the old connection lingers.
    tcp_close: bool = False
    # Post-copy memory (CRIU's lazy_pages): private anonymous pages are not written before the
    # tree resumes but handed in through userfaultfd by a ``criu lazy-pages`` daemon, which
    # must already listen on ``lazy-pages.socket`` in the restore's work dir (the engine's
    # ``log_dir``): see ``torpor._lazy._restore``.
    lazy_pages: bool = False
    # CRIU's default. Errors and warnings are kept; -v4's per-mapping lines cost a 100 MiB
    # restore ~4 ms (measured), and a successful restore's log is deleted anyway.
    log_level: int = 2


@dataclass(frozen=True)
class DumpResult:
    """A finished dump: ``restored`` is true in a self-dumped process that was restored."""

    restored: bool
    log_path: Path
    seconds: float


@dataclass(frozen=True)
class RestoreResult:
    """A finished restore: the host pid of the restored root."""

    pid: int
    log_path: Path
    seconds: float


def rpc_opts(
    o: DumpOptions | RestoreOptions,
    *,
    images_dir_fd: int,
    log_file: str,
    notify: NotifyHandler | None,
) -> pb.Opts:
    """The options dump and restore share; established TCP needs the network locked (with
    nftables: this machine kind has no iptables) on both sides."""
    opts = pb.Opts(
        images_dir_fd=images_dir_fd,
        tcp_established=o.tcp_established,
        shell_job=o.shell_job,
        ext_unix_sk=o.ext_unix_sk,
        file_locks=o.file_locks,
        log_file=log_file,
        log_level=o.log_level,
        notify_scripts=notify is not None,
    )
    opts.external.extend(o.external)
    # With tcp_close too: the restore then removes the lock table the dump left for the
    # connections (CRIU names it after the dump), which nothing else would.
    if o.tcp_established or (isinstance(o, RestoreOptions) and o.tcp_close):
        opts.network_lock = pb.NFTABLES
    return opts
