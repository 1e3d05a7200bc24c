"""A keeper's self-dumps: a child asks to be checkpointed, the keeper does it for it.

CRIU must run outside the tree it dumps, and a PID namespace's init cannot start it itself, so
a managed app asks its keeper (root) over ``@torpor-keeper-<pid>``. The app sends a JSON
request only (:func:`parse_request`); the keeper never forwards anything of it to CRIU:

1. the peer is authenticated (one of the keeper's children, its credentials: ``SO_PEERCRED``
   and its /proc status, ``_peer.identify``) while it is held by a pidfd: it must still be
   the process of its pid once its request is read (:func:`receive`), so a peer that exited,
   its pid reused by a child, is not taken for that child. Every field is checked; a request
   carrying fds is refused;
2. the staging directory is opened with the peer's credentials (``O_NOFOLLOW``), and must be
   a directory the peer could have made itself: owned by its uid, not writable by group or
   others, and empty. The keeper then takes it (root-owned, 0700) for the whole dump, so
   nothing else can plant a file in it while root's CRIU writes there;
3. the keeper makes the socketpair (so CRIU resolves the directory fd in the keeper's fd
   table) and builds the DUMP request: the peer's own tree (its record's pid, never a pid
   from the peer; every thread of it with the peer's credentials, ``_peer.tree_problem``,
   checked again by CRIU at post-dump), into the directory fd, options from the request. The
   request is queued in the socket *before* the app gets its end: CRIU reads one request, so
   nothing the app writes there reaches it. CRIU starts once the app has its end and has hung
   up (a connection to the keeper would be a socket CRIU cannot dump);
4. the app reads only the response (``_engine.receive_dump``): CRIU sees the app's end as
   its service socket, so a restored copy gets its own response (``restored=True``);
5. once CRIU has exited the keeper seals the image in the directory while it is still its
   own (``_images._image.seal``, the one place images are hashed, their manifest written and
   signed: files 0600, owned by the peer's uid), hands the directory back and renames it to
   the image name with the peer's credentials. The original app, if it lives on
   (``leave_running``, or a failed dump), asks to ``collect`` the outcome: the files are its
   to read only then.

A self-dump is as crash-safe as a checkpoint from outside (``_images._incomplete``): before
CRIU starts the keeper locks the directory, writes the record of what the manifest needs and
reserves the space the commit needs (``_finalize.before_dump``), and puts the image in the
image index. If the image cannot be finished once CRIU has killed the app (a full disk, the
keeper killed), the directory stays an *incomplete* image that ``torpor images`` lists and
``torpor image repair`` finishes — for a root app; an unprivileged app's directory is handed
back to it, and torpor, as root, does not trust what another user can change.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import stat
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _paths
from .._engine import DUMP_LOG, DumpOptions, criu_version, dump_request, start_swrk
from .._errors import AlreadyExistsError, PermissionDeniedError, TorporError, UsageError
from .._images._image import Image, check_same, give, published, rename_noreplace
from .._images._incomplete import Record, drop_bookkeeping, lock
from .._safe import create_file, is_plain_name, lstat_entries, open_regular
from ._finalize import ImageFacts, before_dump, not_finished, seal_reserved, supervision_of
from ._peer import Peer, TreeGuard, run_as, still_there, tree_problem
from ._proc import facts as process_facts
from ._registry import ManagedProcess

PROTOCOL = 1
MAX_REQUEST = 64 << 10
MAX_PATH = 4096
MAX_LABELS = 64
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 1024
# The app takes its end of the socketpair and hangs up at once: a slow one is not waited for.
HANDOVER_TIMEOUT = 10.0
_FD_SPACE = socket.CMSG_SPACE(16 * 4)

# The label ``torpor.checkpoint()`` without a path sets (``_coord._checkpoint``, which must not
# be imported here): the image is wanted in the app's series only (the app removes its local
# copy once the keeper says it is in the pool).
SERIES_ONLY_LABEL = "torpor.series-only"
_DUMP_KEYS = {"v", "op", "staging", "dest", "name", "labels", "leave_running", "tcp_established"}


@dataclass(frozen=True)
class DumpRequest:
    """A child's request to be dumped into the staging directory ``staging`` (an absolute
    path), to become the image directory ``dest`` (a plain name) beside it."""

    staging: str
    dest: str
    name: str
    leave_running: bool
    tcp_established: bool
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CollectRequest:
    """The original of a self-dump, running on, asks how its dump ended."""


Request = DumpRequest | CollectRequest


def receive(conn: socket.socket) -> bytes:
    """One request packet from ``conn``: refused if it carries fds (a keeper takes none: an
    older torpor sent CRIU's socket), does not fit, or its sender's connecting process is gone
    (``_peer.still_there``)."""
    data, anc, flags, _ = conn.recvmsg(MAX_REQUEST, _FD_SPACE)
    fds = array.array("i")
    for level, kind, blob in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
    for fd in fds:
        os.close(fd)
    if fds or flags & socket.MSG_CTRUNC:
        raise PermissionDeniedError(
            "the request carried file descriptors; a keeper takes none and runs CRIU itself",
            hint="the app runs an older torpor: upgrade it",
        )
    if flags & socket.MSG_TRUNC:
        raise UsageError(f"request over {MAX_REQUEST} bytes; refused")
    # The keeper looked the peer up among its children by pid before this: believed only if
    # the peer is still the process of that pid (a peer gone since, its pid reused by a new
    # child, is refused), see ``_peer.still_there``.
    still_there(conn)
    return data


def parse_request(data: bytes) -> Request:
    """The request in ``data``; :class:`UsageError` saying what is wrong with it otherwise."""
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"malformed request: {exc}") from None
    if not isinstance(msg, dict):
        raise UsageError("malformed request: not a JSON object")
    if msg.get("v") != PROTOCOL:
        raise UsageError(f"request of protocol {msg.get('v')!r}, this keeper speaks {PROTOCOL}")
    op = msg.get("op")
    if op == "collect":
        _exact_keys(msg, {"v", "op"})
        return CollectRequest()
    if op != "self-dump":
        raise UsageError(f"unknown request {op!r}")
    _exact_keys(msg, _DUMP_KEYS)
    staging = msg["staging"]
    if not (isinstance(staging, str) and _absolute_path(staging)):
        raise UsageError(f"staging {staging!r} is not a normalised absolute path")
    dest, name = msg["dest"], msg["name"]
    if not is_plain_name(dest) or dest == os.path.basename(staging):
        raise UsageError(f"dest {dest!r} is not a plain name beside the staging directory")
    if not is_plain_name(name):
        raise UsageError(f"image name {name!r} is not a plain name")
    for key in ("leave_running", "tcp_established"):
        if type(msg[key]) is not bool:
            raise UsageError(f"{key} {msg[key]!r} is not a boolean")
    return DumpRequest(
        staging=staging,
        dest=dest,
        name=name,
        leave_running=msg["leave_running"],
        tcp_established=msg["tcp_established"],
        labels=_labels(msg["labels"]),
    )


def _exact_keys(msg: dict[str, Any], keys: set[str]) -> None:
    extra, missing = sorted(set(msg) - keys), sorted(keys - set(msg))
    if extra or missing:
        raise UsageError(
            "malformed request: "
            + "; ".join(
                part
                for part in (
                    f"unknown field(s) {', '.join(extra)}" if extra else "",
                    f"missing field(s) {', '.join(missing)}" if missing else "",
                )
                if part
            )
        )


def _absolute_path(path: str) -> bool:
    return (
        path.startswith("/")
        and len(path.encode(errors="surrogatepass")) <= MAX_PATH
        and "\0" not in path
        and os.path.normpath(path) == path
        and path != "/"
        and is_plain_name(os.path.basename(path))
    )


def _labels(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_LABELS:
        raise UsageError(f"labels must be an object of at most {MAX_LABELS} strings")
    for k, v in value.items():
        if not (
            isinstance(k, str)
            and isinstance(v, str)
            and 0 < len(k) <= MAX_LABEL_KEY
            and len(v) <= MAX_LABEL_VALUE
        ):
            raise UsageError(f"label {k!r} is not a short string key with a string value")
    return dict(value)


def staging_problem(st: os.stat_result, peer: Peer) -> str | None:
    """Why a staging directory with ``stat`` ``st`` is not one ``peer`` could have made for
    its own dump (None: it is)."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != peer.uid:
        return f"is owned by uid {st.st_uid}, not by the requester (uid {peer.uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


# -- one self-dump ----------------------------------------------------------------------------


class SelfDump:
    """One dump a keeper runs for its child ``rec`` (connected as ``peer``)."""

    def __init__(self, peer: Peer, rec: ManagedProcess, req: DumpRequest) -> None:
        self.peer = peer
        self.rec = rec
        self.req = req
        self.parent = Path(os.path.dirname(req.staging))
        self.staging_name = os.path.basename(req.staging)
        self.parent_fd = -1
        self.dir_fd = -1
        self._st: os.stat_result | None = None  # the directory as the peer handed it over
        self.record: Record | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.outcome: dict[str, Any] | None = None
        self.joins: Image | None = None  # a supervised app's image for its series
        self._done = threading.Event()

    # -- before CRIU --------------------------------------------------------------------

    def prepare(self) -> None:
        """Open and take the staging directory, check the tree (see the module docstring)."""
        problem = tree_problem(self.rec.pid, self.peer)
        if problem is not None:
            raise PermissionDeniedError(f"dump of process {self.rec.pid} refused: {problem}")
        try:
            self.parent_fd, self.dir_fd = run_as(self.peer, self._open)
        except OSError as exc:
            raise PermissionDeniedError(
                f"staging directory {self.req.staging} cannot be opened as uid {self.peer.uid}"
                f" ({exc.strerror}); refused"
            ) from exc
        st = os.fstat(self.dir_fd)
        problem = staging_problem(st, self.peer)
        if problem is None:
            here = os.stat(self.staging_name, dir_fd=self.parent_fd, follow_symlinks=False)
            if (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
                problem = "was replaced while it was opened"
        if problem is not None:
            raise PermissionDeniedError(f"staging directory {self.req.staging} {problem}; refused")
        self._st = st  # from here on it is handed back, whatever happens
        os.fchown(self.dir_fd, 0, 0)
        os.fchmod(self.dir_fd, 0o700)
        # Taken: from now on only root can add to it. What was put there before is refused
        # (a symlink CRIU would write through, a file it would truncate).
        planted = sorted(lstat_entries(self.dir_fd))
        if planted:
            self.hand_back()
            shown = ", ".join(planted[:5]) + (" …" if len(planted) > 5 else "")
            raise PermissionDeniedError(
                f"staging directory {self.req.staging} is not empty (holds {shown}); refused"
            )

    def _open(self) -> list[int]:
        parent = os.open(self.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            return [parent, os.open(self.staging_name, flags, dir_fd=parent)]
        except BaseException:
            os.close(parent)
            raise

    def launch(self, conn: socket.socket, criu: str, guard: TreeGuard) -> None:
        """Hand the app its end of CRIU's socket and start CRIU on the other (step 3)."""
        cmdline, rss = process_facts(self.rec.pid)
        facts = ImageFacts(
            name=self.req.name,
            pid=self.rec.pid,
            cmdline=cmdline,
            rss_bytes=rss,
            criu_version=criu_version(),
            tcp_established=self.req.tcp_established,
            labels=self.req.labels,
        )
        record = facts.record(
            self.req.dest,
            start_time=self.rec.start_time,
            leave_running=self.req.leave_running,
            held_by_process=False,  # the keeper holds the lock until the image is made
        )
        # Held until the image is made: a sweep or repair meanwhile leaves the directory be.
        if not lock(self.dir_fd, wait=False):
            raise PermissionDeniedError(
                f"staging directory {self.req.staging} is locked by another process; refused"
            )
        before_dump(self.dir_fd, record, staging=Path(self.req.staging))
        self.record = record
        # -v4: the log of a request the keeper built names the tree CRIU dumped ("Dumping
        # processes (pid: N)"), the evidence that only the child's own tree ever is.
        options = DumpOptions(
            leave_running=self.req.leave_running,
            tcp_established=self.req.tcp_established,
            log_level=4,
        )
        app_end, criu_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with criu_end:
            with app_end:
                app_end.send(dump_request(self.rec.pid, self.dir_fd, options))
                reply = json.dumps({"ok": True}).encode()
                rights = array.array("i", [app_end.fileno()])
                conn.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            conn.settimeout(HANDOVER_TIMEOUT)
            try:
                rest = conn.recv(1)
            except OSError as exc:
                raise PermissionDeniedError(f"the app did not take CRIU's socket: {exc}") from exc
            if rest:
                raise UsageError("the app wrote after its request instead of hanging up")
            unprivileged = not self.peer.privileged
            self.proc = start_swrk(
                criu,
                criu_end.fileno(),
                options=guard.options() if unprivileged else (),
                env=guard.env(self.peer) if unprivileged else None,
            )

    # -- after CRIU -----------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Wait for CRIU, then make the image and give it to the peer (step 5); the outcome
        as the ``collect`` reply says it."""
        outcome: dict[str, Any] = {"ok": False, "error": "the keeper failed"}
        try:
            assert self.proc is not None  # launched
            self.proc.wait()
            outcome = self._finish()
            if self.joins is not None and self.req.labels.get(SERIES_ONLY_LABEL) == "1":
                # Asked for without a place to keep it (``torpor.checkpoint()`` with no
                # path): pushed before the app is answered, so that it can drop its copy.
                from .._supervise._series import join_series

                joins, self.joins = self.joins, None
                member = join_series(self.rec.name, joins)
                if member is not None:
                    outcome["series"] = member
        except TorporError as exc:
            outcome = {"ok": False, "error": str(exc)}
        except OSError as exc:
            outcome = {"ok": False, "error": f"finishing the image failed: {exc}"}
        except Exception as exc:  # a bug: the app waiting to collect must hear of it still
            traceback.print_exc()
            outcome = {"ok": False, "error": f"the keeper failed: {exc!r}"}
        finally:
            self.hand_back()
            self.close()
            self.outcome = outcome
            self._done.set()
        if self.joins is not None:
            # A supervised app's own checkpoint joins its series (issue 8): pushed, recorded
            # and pruned on a thread of its own, the app's call answered already.
            from .._supervise._series import join_series_quietly

            threading.Thread(
                target=join_series_quietly,
                args=(self.rec.name, self.joins),
                name="torpor-join-series",
                daemon=True,
            ).start()
        return outcome

    def _finish(self) -> dict[str, Any]:
        owner = (self.peer.uid, self.peer.gid)
        staging = Path(self.req.staging)
        entries = lstat_entries(self.dir_fd)
        succeeded = "stats-dump" in entries and stat.S_ISREG(entries["stats-dump"].st_mode)
        if not succeeded:
            kept = self._keep_log()
            drop_bookkeeping(self.dir_fd)  # nothing to finish: the app runs on
            give(self.dir_fd, sorted(lstat_entries(self.dir_fd)), owner, source=str(staging))
            return {"ok": True, "image": None, "log": str(kept) if kept else None}
        assert self.record is not None  # set by launch, before CRIU started
        supervision = supervision_of(self.rec.name)
        sealed = seal_reserved(
            self.dir_fd, staging, self.record, owner=owner, supervision=supervision
        )
        self.hand_back()
        dest = self.req.dest
        try:
            with published(self.parent, self.staging_name, dest):
                run_as(self.peer, lambda: self._rename(dest))
        except (OSError, AlreadyExistsError) as exc:
            raise not_finished(self.record, staging, exc) from exc
        os.fsync(self.parent_fd)
        drop_bookkeeping(self.dir_fd)
        if supervision is not None and self.req.leave_running:
            # Pushed by finish() once the app has its answer (the manifest is the one sealed
            # here, which the push checks the app's directory against).
            self.joins = Image(self.parent / dest, sealed.manifest, signer=sealed.signer)
        return {"ok": True, "image": str(self.parent / dest)}

    def _rename(self, dest: str) -> list[int]:
        """(With the peer's credentials.) The staging directory, still where it was, to its
        image name."""
        check_same(self.parent_fd, self.staging_name, self.dir_fd)
        rename_noreplace(self.parent_fd, self.staging_name, dest)
        return []

    def _keep_log(self) -> Path | None:
        """A failed dump's log, copied to the keeper's logs (the staging directory goes)."""
        try:
            src = open_regular(self.dir_fd, DUMP_LOG, source=self.req.staging)
        except OSError:
            return None
        try:
            logs = _paths.logs_dir()
            stamp = time.strftime("%Y%m%dT%H%M%S")
            name = f"dump-{self.rec.pid}-{stamp}-{os.urandom(3).hex()}.log"
            logs_fd = os.open(logs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                dst = create_file(logs_fd, name, source=str(logs))
            finally:
                os.close(logs_fd)
            with os.fdopen(dst, "wb") as out:
                while chunk := os.read(src, 1 << 20):
                    out.write(chunk)
            return logs / name
        except (TorporError, OSError):
            return None
        finally:
            os.close(src)

    def hand_back(self) -> None:
        """Give the staging directory back to the peer as it was handed over (idempotent)."""
        st, self._st = self._st, None
        if st is None or self.dir_fd < 0:
            return
        with contextlib.suppress(OSError):
            os.fchown(self.dir_fd, st.st_uid, st.st_gid)
            os.fchmod(self.dir_fd, stat.S_IMODE(st.st_mode))

    def close(self) -> None:
        """Close the directory fds (CRIU has exited, or never started)."""
        for fd in (self.dir_fd, self.parent_fd):
            if fd >= 0:
                os.close(fd)
        self.dir_fd = self.parent_fd = -1

    def abort(self) -> None:
        """Undo :meth:`prepare` (and :meth:`launch`'s record) for a dump that never started."""
        if self.dir_fd >= 0 and self._st is not None:
            drop_bookkeeping(self.dir_fd)
        self.hand_back()
        self.close()
        self.outcome = {"ok": True, "image": None, "log": None}
        self._done.set()

    def wait(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The outcome once the dump is finished (None on timeout)."""
        self._done.wait(timeout)
        return self.outcome
