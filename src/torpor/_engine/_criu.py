"""The checkpoint engine: CRIU driven over its RPC protocol.

This module is the one boundary where CRIU's failures become torpor errors: a failed response
is turned into :class:`~torpor.DumpError` / :class:`~torpor.RestoreError` carrying the pid,
the image, the log path and the real error lines of the log (CRIU's ``cr_errmsg`` holds the
first logged error, which here is always a harmless rlimit line, so we read the log instead).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .. import _paths, _safe
from .._errors import (
    CriuError,
    CriuUnavailableError,
    DumpError,
    PermissionDeniedError,
    RestoreError,
)
from .._proto import criu_rpc_pb2 as pb
from . import _cwdlock
from ._failures import _CriuDied, _died, _failure, _hint_for, _how_it_ended
from ._failures import log_errors as log_errors
from ._options import CriuVersion as CriuVersion
from ._options import DumpOptions as DumpOptions
from ._options import DumpResult as DumpResult
from ._options import Features as Features
from ._options import RestoreOptions as RestoreOptions
from ._options import RestoreResult as RestoreResult
from ._options import rpc_opts
from ._rpc import Connection, NotifyHandler, TransportError

MIN_VERSION = (4, 2)
_CANDIDATES = ("/usr/local/sbin/criu", "/usr/sbin/criu")
DUMP_LOG = "criu-dump.log"
# The options of a call that names none (frozen values, shared safely).
_DUMP_DEFAULTS = DumpOptions()
_RESTORE_DEFAULTS = RestoreOptions()
_INSTALL_HINT = "run scripts/install-criu.sh (builds CRIU 4.2.1 from Debian's source) as root"


@functools.cache
def find_criu() -> str:
    """Path of a CRIU >= 4.2 (``TORPOR_CRIU`` overrides the search). Cached per process."""
    return _find()[0]


def criu_version() -> str:
    """The found CRIU's version string (``4.2.1``), from its ``--version``."""
    return _find()[1]


@functools.cache
def _find() -> tuple[str, str]:
    env = os.environ.get("TORPOR_CRIU")
    candidates = [env] if env else [*_CANDIDATES, shutil.which("criu") or ""]
    seen: list[str] = []
    for cand in candidates:
        if not cand or not os.access(cand, os.X_OK) or cand in seen:
            continue
        seen.append(cand)
        ver = _cli_version(cand)
        if ver is not None and _version_tuple(ver) >= MIN_VERSION:
            return cand, ver
    found = ", ".join(seen) or "none"
    raise CriuUnavailableError(
        f"no CRIU >= {MIN_VERSION[0]}.{MIN_VERSION[1]} found (checked: {found})", hint=_INSTALL_HINT
    )


def _version_tuple(ver: str) -> tuple[int, ...]:
    return tuple(int(x) for x in ver.split(".")[:2])


def _cli_version(binary: str) -> str | None:
    """``criu --version``, remembered per binary (path, inode, size, mtime) in the torpor
    home: running it costs ~6 ms on every command otherwise."""
    try:
        st = os.stat(binary)
    except OSError:
        return None
    from .._errors import TorporError

    stamp = f"{binary}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    cache = "criu-version.json"
    try:
        # Only a cache torpor could have written (0600, ours or root's, not a symlink).
        known = json.loads(_paths.read_home_file(cache) or b"{}")
    except (TorporError, OSError, ValueError):
        known = {}  # an unusable home: the command says so itself, `torpor doctor` goes on
    if isinstance(known, dict) and isinstance(known.get(stamp), str):
        return str(known[stamp])
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return None
    m = re.search(r"Version:\s*(\d+\.\d+(?:\.\d+)?)", out)
    if not m:
        return None
    with contextlib.suppress(TorporError, OSError):
        _paths.write_home_file(cache, json.dumps({stamp: m.group(1)}).encode())
    return m.group(1)


class CriuEngine:
    """Checkpoint and restore through ``criu swrk``.

    Each call starts its own swrk process (they are cheap: ~15 ms), so calls may run
    concurrently from several threads.
    """

    def __init__(self, binary: str | None = None, log_dir: Path | None = None) -> None:
        self.binary = binary or find_criu()
        self._log_dir = log_dir

    @property
    def log_dir(self) -> Path:
        """Where CRIU logs go (``<home>/logs`` unless given)."""
        return self._log_dir or _paths.logs_dir()

    # -- queries ---------------------------------------------------------------------------

    def version(self) -> CriuVersion:
        """CRIU's version (VERSION request)."""
        resp = self._simple(pb.Req(type=pb.VERSION))
        v = resp.version
        return CriuVersion(v.major_number, v.minor_number, v.sublevel, v.gitid)

    def check(self) -> None:
        """Run CRIU's own kernel check (CHECK); raise :class:`CriuError` if it fails."""
        with self._logfile("check") as (log_name, log_path), _dir_fd(self.log_dir) as dfd:
            opts = pb.Opts(images_dir_fd=dfd, log_file=log_name, log_level=4)
            resp = self._simple(pb.Req(type=pb.CHECK, opts=opts), pass_fds=(dfd,))
            if not resp.success:
                lines = log_errors(log_path)
                raise CriuError(
                    "`criu check` failed: " + (lines[0] if lines else "no detail"),
                    log_path=log_path,
                    log_lines=lines,
                    hint=_INSTALL_HINT,
                )

    def features(self) -> Features:
        """Which optional features work here (FEATURE_CHECK)."""
        req = pb.Req(
            type=pb.FEATURE_CHECK,
            features=pb.Features(mem_track=True, lazy_pages=True, pidfd_store=True),
        )
        f = self._simple(req).features
        return Features(f.mem_track, f.lazy_pages, f.pidfd_store)

    # -- dump / restore ----------------------------------------------------------------

    def dump(
        self,
        pid: int,
        images_dir: Path,
        options: DumpOptions = _DUMP_DEFAULTS,
        *,
        notify: NotifyHandler | None = None,
        connection: Connection | None = None,
    ) -> DumpResult:
        """Dump the tree rooted at ``pid`` into ``images_dir``.

        ``connection`` is an swrk connection made elsewhere (a self-dump needs CRIU outside
        its own tree); by default a new swrk child is started. On failure the tree keeps
        running (CRIU thaws it) and :class:`DumpError` says why.
        """
        o = options
        # The dump's work dir is the image dir itself: CRIU writes ``stats-dump`` there only
        # after a successful dump, which is how a self-dump's finaliser knows the image is
        # whole. The log stays beside the image (not part of it); on failure it is moved to
        # the logs dir before the staging directory goes.
        log_path = images_dir / DUMP_LOG
        if connection is None:
            dir_fd: contextlib.AbstractContextManager[int] = _image_dir(images_dir)
        else:
            # CRIU opens this one by path: nobody but us may be able to change the way to it.
            _check_path(images_dir)
            dir_fd = contextlib.nullcontext(-1)
        # Not for a self-dump: the lock's fd would be dumped with the caller.
        cwd_locks = _cwdlock.held(pid) if connection is None else contextlib.nullcontext(0)
        with dir_fd as dfd, cwd_locks:
            opts = rpc_opts(o, images_dir_fd=dfd, log_file=DUMP_LOG, notify=notify)
            opts.pid = pid
            opts.leave_running = o.leave_running
            opts.link_remap = o.link_remap
            if connection is not None:
                # A self-dump: an fd of ours would be dumped with us and restored pointing at
                # the staging directory, which is gone by then. Name the directory instead.
                opts.images_dir = str(images_dir)
            req = pb.Req(type=pb.DUMP, opts=opts)
            started = time.perf_counter()
            try:
                resp, notify_error = self._call(
                    req,
                    notify,
                    connection,
                    pass_fds=(dfd,) if dfd >= 0 else (),
                    kind="dump",
                    pid=pid,
                    image=images_dir,
                    log_path=log_path,
                )
            except CriuError as exc:
                exc.log_path = str(self._keep_log(log_path, pid))
                raise
            except _CriuDied as died:
                raise _died(
                    DumpError,
                    died,
                    pid=pid,
                    image=images_dir,
                    log_path=self._keep_log(log_path, pid),
                ) from died.__cause__
            if not resp.success:
                kept_log = self._keep_log(log_path, pid)
                raise _failure(
                    DumpError,
                    "checkpoint",
                    resp,
                    pid,
                    images_dir,
                    kept_log,
                    notify_error,
                    kept="the process keeps running",
                )
            return DumpResult(resp.dump.restored, log_path, time.perf_counter() - started)

    def _keep_log(self, log_path: Path, pid: int) -> Path:
        """Move a failed dump's log out of the staging directory, into the logs dir."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        dest = self.log_dir / f"dump-{pid}-{stamp}-{os.urandom(3).hex()}.log"
        try:
            shutil.move(str(log_path), dest)
        except OSError:
            return log_path
        return dest

    def restore(
        self,
        images_dir: Path,
        options: RestoreOptions = _RESTORE_DEFAULTS,
        *,
        notify: NotifyHandler | None = None,
        connection: Connection | None = None,
        connection_fds: Collection[int] = (),
        images_dir_fd: int | None = None,
    ) -> RestoreResult:
        """Restore the image in ``images_dir``; the root is detached (and our child if
        ``rst_sibling``). On failure nothing restored is left running.

        ``images_dir_fd`` is the directory as the caller verified it (``Image.opened()``; it
        stays the caller's to close): CRIU then reads that very directory, whatever the path
        names by now. Without it the path is opened here, and refused
        (:class:`~torpor.UnsafePathError`) unless it and every directory on the way to it are
        ones only their owner (us or root) can change: else another user could swap the
        image between its verification and CRIU. Symlinks in the image (a derived image's)
        must lead into such directories too.

        ``connection`` is an swrk child started ahead of time by this process (a warm one saves
        CRIU's start-up on the restore's critical path); the caller closes it. CRIU opens the
        images and work dirs as ``/proc/<our pid>/fd/N``, so they need not be passed to a child
        that is already running; inherited fds must be in CRIU's own fd table. They are if the
        child was given them when it started: ``connection_fds`` are the fds of ours it got
        then (``pass_fds``: at the same numbers). Unless every one of ``inherit_fds`` is among
        them, a fresh child is started instead.
        """
        o = options
        if not set(o.inherit_fds.values()) <= set(connection_fds):
            connection = None
        image_fd: contextlib.AbstractContextManager[int] = (
            _image_dir(images_dir)
            if images_dir_fd is None
            else contextlib.nullcontext(images_dir_fd)
        )
        with (
            self._logfile("restore") as (log_name, log_path),
            image_fd as dfd,
            _dir_fd(self.log_dir) as wfd,
        ):
            _check_image_dir(images_dir, dfd)
            opts = rpc_opts(o, images_dir_fd=dfd, log_file=log_name, notify=notify)
            opts.work_dir_fd = wfd
            opts.rst_sibling = o.rst_sibling
            opts.leave_stopped = o.leave_stopped
            opts.tcp_close = o.tcp_close
            opts.lazy_pages = o.lazy_pages
            if o.root:
                opts.root = o.root
            for key, fd in o.inherit_fds.items():
                opts.inherit_fd.append(pb.InheritFd(key=key, fd=fd))
            started = time.perf_counter()
            try:
                resp, notify_error = self._call(
                    pb.Req(type=pb.RESTORE, opts=opts),
                    notify,
                    connection,
                    pass_fds=(dfd, wfd, *o.inherit_fds.values()),
                    kind="restore",
                    pid=None,
                    image=images_dir,
                    log_path=log_path,
                )
            except _CriuDied as died:
                raise _died(
                    RestoreError, died, pid=None, image=images_dir, log_path=log_path
                ) from died.__cause__
            if not resp.success:
                raise _failure(
                    RestoreError,
                    "restore",
                    resp,
                    None,
                    images_dir,
                    log_path,
                    notify_error,
                    kept="nothing was left running",
                )
            # A successful restore's log says nothing anyone needs; failures keep theirs.
            with contextlib.suppress(OSError):
                log_path.unlink()
            return RestoreResult(resp.restore.pid, log_path, time.perf_counter() - started)

    # -- plumbing ----------------------------------------------------------------------

    def _simple(self, req: pb.Req, pass_fds: Sequence[int] = ()) -> pb.Resp:
        kind = _type_name(req.type)
        try:
            resp, _ = self._call(
                req,
                None,
                None,
                pass_fds=pass_fds,
                kind=kind,
                pid=None,
                image=None,
                log_path=None,
            )
        except _CriuDied as died:
            raise CriuError(
                f"CRIU's {kind} request failed: CRIU {died.how}", hint=_INSTALL_HINT
            ) from died.__cause__
        return resp

    def _call(
        self,
        req: pb.Req,
        notify: NotifyHandler | None,
        conn: Connection | None,
        *,
        pass_fds: Sequence[int],
        kind: str,
        pid: int | None,
        image: Path | None,
        log_path: Path | None,
    ) -> tuple[pb.Resp, BaseException | None]:
        own = conn is None
        try:
            if conn is None:
                conn = Connection.spawn(self.binary, pass_fds, restoring=kind == "restore")
        except OSError as exc:
            raise CriuUnavailableError(
                f"cannot start {self.binary}: {exc}", hint=_INSTALL_HINT
            ) from exc
        try:
            resp = conn.call(req, notify)
            return resp, conn.notify_error
        except TransportError as exc:
            broke = exc
        finally:
            if own:
                conn.close()
        raise _CriuDied(_how_it_ended(conn, broke)) from broke

    @contextmanager
    def _logfile(self, prefix: str) -> Iterator[tuple[str, Path]]:
        name = f"{prefix}-{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(3).hex()}.log"
        yield name, self.log_dir / name


def dump_request(pid: int, images_dir_fd: int, options: DumpOptions) -> bytes:
    """A serialised DUMP request of the tree rooted at ``pid`` into the directory
    ``images_dir_fd`` (an fd of the process that created the swrk socketpair: CRIU opens it as
    ``/proc/<creator>/fd/N``), logging to :data:`DUMP_LOG` there, without notifications.

    For a keeper that dumps a child on the child's request: the keeper builds the request, so
    nothing of it comes from the child.
    """
    opts = rpc_opts(options, images_dir_fd=images_dir_fd, log_file=DUMP_LOG, notify=None)
    opts.pid = pid
    opts.leave_running = options.leave_running
    opts.link_remap = options.link_remap
    return bytes(pb.Req(type=pb.DUMP, opts=opts).SerializeToString())


def receive_dump(
    connection: Connection,
    pid: int,
    images_dir: Path,
    *,
    settle: Callable[[], Path | None],
) -> DumpResult:
    """The outcome of a dump of ``pid`` (the caller itself) that someone else asked CRIU for on
    ``connection`` (a keeper: see :func:`dump_request`): we only read the response.

    In a restored copy it returns at once (``restored=True``). In the original ``settle`` is
    called first: it waits until the directory's files are ours to read and returns where the
    log was kept for the user (None: in ``images_dir``), which a failure names; the log's lines
    are read from ``images_dir``. Raises :class:`DumpError` as :meth:`CriuEngine.dump` does.
    """
    log_path = images_dir / DUMP_LOG
    started = time.perf_counter()
    try:
        resp = connection.receive()
    except TransportError as exc:
        kept = settle() or log_path
        lines = log_errors(log_path)
        said = f"; its log says: {lines[0]}" if lines else ""
        # Someone else's CRIU: how it ended is theirs to know. We are the process, running.
        raise DumpError(
            f"checkpoint of pid {pid} failed: CRIU ended without answering ({exc}){said} "
            f"(the process keeps running; log: {kept})",
            pid=pid,
            image=images_dir,
            log_path=kept,
            log_lines=lines,
            hint=_hint_for(lines),
        ) from exc
    if resp.success and resp.dump.restored:
        return DumpResult(True, log_path, time.perf_counter() - started)
    kept = settle() or log_path
    if not resp.success:
        raise _failure(
            DumpError,
            "checkpoint",
            resp,
            pid,
            images_dir,
            kept,
            None,
            kept="the process keeps running",
            lines=log_errors(log_path),
            ourselves=True,
        )
    return DumpResult(False, log_path, time.perf_counter() - started)


def _type_name(t: int) -> str:
    return str(pb.ReqType.Name(t)).lower()


@contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    try:
        fd = _safe.open_dir(path)
    except PermissionError as exc:
        raise PermissionDeniedError(f"cannot open {path}: permission denied") from exc
    try:
        _safe.check_private(path, fd=fd)
        yield fd
    finally:
        os.close(fd)


def _check_path(path: Path) -> None:
    """Refuse a directory CRIU is to use by path unless only its owner (us or root) can change
    it and every directory on the way to it (see :func:`torpor._safe.check_ancestors`)."""
    _safe.check_ancestors(path, what="image directory")
    _safe.check_private(path, what="image directory")


@contextmanager
def _image_dir(path: Path) -> Iterator[int]:
    """An fd of the image directory ``path`` for CRIU (``O_NOFOLLOW``), once the way to it is
    safe: nobody else can swap it between its checks and CRIU's reads or writes."""
    _safe.check_ancestors(path, what="image directory")
    with _dir_fd(path) as fd:
        yield fd


def _check_image_dir(path: Path, fd: int) -> None:
    """The directory ``fd`` (of ``path``) must be private, and a symlink in it (CRIU follows
    them: a derived image's lead to the image's files) lead into a safe directory."""
    _safe.check_private(path, what="image directory", fd=fd)
    seen: set[Path] = set()
    for name, st in _safe.lstat_entries(fd).items():
        if not stat.S_ISLNK(st.st_mode):
            continue
        target = path / os.readlink(name, dir_fd=fd)
        if target.parent not in seen:
            _safe.check_ancestors(target, what=f"image file {path / name} (a symlink to)")
            seen.add(target.parent)
