"""The keeper: the parent of managed processes.

``torpor run`` and ``torpor restore`` fork a keeper (a session leader, detached from the
terminal) and return once it reports. The keeper:

- creates the app's PID namespace and starts the app as its pid 1 (``run``), or restores
  images with ``rst_sibling`` so restored roots are its children (``restore``): being the parent
  means exits are reaped at once (this VM's init reaps orphans late, and a restore that reuses a
  pid too soon fails) and exit statuses are recorded;
- dumps a child that asks to be checkpointed over ``@torpor-keeper-<keeper pid>`` (CRIU must run
  outside the dumped tree, and a PID namespace's orphans re-parent to its init, so the app
  cannot start it itself): the keeper builds the CRIU request itself, for the child's own tree
  only, into a directory the child could have made, and makes the image (``_keeper_dump``).

It exits when its last child has ended and no dump is in flight.

This module owns the keeper's state (its children, their records, the self-dumps in flight),
its socket server and its lifecycle (forked by :func:`spawn`, or hosted by an agent worker).
Its parts live beside it, and none imports it (the restore path names ``Keeper`` for typing):

- ``_keeper_restore``: the restore path (:meth:`Keeper.restore`);
- ``_keeper_dump``: a self-dump's request, checks and CRIU run;
- ``_keeper_reply``: what a forked keeper reports to the command that forked it;
- ``_keeper_children``: what is done to its child processes (start times, continue, kill);
- ``_keeper_address``: its socket's name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .. import _errors, _paths
from .._engine import Connection, CriuEngine
from .._errors import TorporError
from .._images._manifest import now_iso
from . import _keeper_dump, _keeper_fence, _keeper_reply, _keeper_restore, _locks, _peer, _registry
from ._keeper_address import address as address
from ._keeper_children import child_start_time, exec_app, kill
from ._keeper_children import continue_tree as continue_tree
from ._keeper_reply import decode_error as decode_error
from ._keeper_reply import encode_error as encode_error
from ._locks import Lock
from ._logs import SpareLog, open_log
from ._proc import CLONE_NEWPID, detached, setns, unshare
from ._registry import ManagedProcess, Reservation

# -- the keeper ----------------------------------------------------------------------------


class Keeper:
    """State of one keeper process (lives in the forked child)."""

    def __init__(self, warm: Connection | None = None, spare_log: SpareLog | None = None) -> None:
        self.pid = os.getpid()
        # A ``criu swrk`` child started ahead of time (by an agent worker), used by the first
        # restore: CRIU's start-up is then off the restore's critical path. ``spare_log`` was
        # given to it at its start: the first copy's log, so that it can be inherited there.
        self.warm = warm
        self.spare_log = spare_log
        self.lock = threading.Lock()
        self.children: dict[int, ManagedProcess] = {}
        # Children started but not yet recorded (pid -> exit code once reaped, else None):
        # a record is written only once what was asked for runs (see record()).
        self.unrecorded: dict[int, int | None] = {}
        # Dump locks of self-dumps in flight (by child pid): held until the image is made.
        self.dump_locks: dict[int, Lock] = {}
        self.busy = 0  # self-dumps in flight
        # The latest self-dump of each child, by pid (its outcome is collected from it).
        self.dumps: dict[int, _keeper_dump.SelfDump] = {}
        self.guard: _peer.TreeGuard | None = None
        self.idle = threading.Condition(self.lock)
        # The supervisor's fence deadline: the children are killed when it passes.
        self.fence = _keeper_fence.Deadline(self._kill_children, self.pid)
        self.listener: socket.socket | None = None

    # -- run --------------------------------------------------------------------------------

    def launch(self, command: Sequence[str], name: str, log_path: Path | None) -> ManagedProcess:
        """Start ``command`` as pid 1 of a new PID namespace; return its record, not yet
        written (see :meth:`record`)."""
        log_fd = open_log(log_path) if log_path else None
        try:
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            # Only the app goes into the new namespace: our later children (CRIU) must not.
            own_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            try:
                unshare(CLONE_NEWPID)
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the app's side
                    os.close(err_r)
                    exec_app(command, name, log_fd, err_w)
                setns(own_ns, CLONE_NEWPID)
            finally:
                os.close(own_ns)
        finally:
            if log_fd is not None:
                os.close(log_fd)
        os.close(err_w)
        failure = os.read(err_r, 4096)
        os.close(err_r)
        if failure:
            os.waitpid(pid, 0)
            raise TorporError(failure.decode(errors="replace"))
        rec = ManagedProcess(
            name=name,
            pid=pid,
            start_time=child_start_time(pid),
            keeper_pid=self.pid,
            command=tuple(command),
            started=now_iso(),
            log_path=str(log_path) if log_path else None,
            managed_as=name,  # exec_app's TORPOR_MANAGED
        )
        self.adopt(rec)
        return rec

    # -- restore ----------------------------------------------------------------------------

    # Copies of an image restored as our children, all or none: the restore path is a module
    # of its own (the function is this method, ``keeper`` its ``self``).
    restore = _keeper_restore.restore

    # -- children ---------------------------------------------------------------------------

    def adopt(self, rec: ManagedProcess) -> None:
        """Take ``rec``'s process as a child (reaped when it ends); its record is written by
        :meth:`record`, or never (:meth:`discard`)."""
        with self.lock:
            self.children[rec.pid] = rec
            self.unrecorded[rec.pid] = None
        threading.Thread(target=self._reap, args=(rec.pid,), daemon=True).start()

    _adopt = adopt  # the name callers used before it was public

    def record(self, recs: Sequence[ManagedProcess], names: Reservation) -> list[ManagedProcess]:
        """Write the records of ``recs`` (started under the names ``names`` holds): all of
        them, or, if one cannot be written, none, and their processes are killed. A process
        that has already ended is recorded as ended."""
        written: list[ManagedProcess] = []
        with self.lock:
            try:
                for rec in recs:
                    code = self.unrecorded[rec.pid]
                    final = rec if code is None else rec.evolve(exit_status=code, ended=now_iso())
                    names.commit(final)
                    written.append(final)
                    del self.unrecorded[rec.pid]
            except BaseException:
                for rec in written:
                    with contextlib.suppress(OSError, TorporError):
                        _registry.delete_if(rec.name, rec.ref)
                self._discard_locked(recs)
                raise
        return written

    def discard(self, recs: Sequence[ManagedProcess]) -> None:
        """Kill the (unrecorded) processes of ``recs``; they are never recorded."""
        with self.lock:
            self._discard_locked(recs)

    def _discard_locked(self, recs: Sequence[ManagedProcess]) -> None:
        for rec in recs:
            self.unrecorded.pop(rec.pid, None)
            if rec.pid in self.children:
                kill(rec.pid)

    def _reap(self, pid: int) -> None:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        with self.lock:
            rec = self.children.pop(pid)
            if pid in self.dumps and self.dumps[pid].outcome is not None:
                del self.dumps[pid]  # nobody is left to collect it
            if pid in self.unrecorded:
                self.unrecorded[pid] = code  # record() writes it as ended
            else:
                # Only the very process's record: the name may belong to a newer one by now,
                # and a deleted record is not brought back.
                with contextlib.suppress(OSError, TorporError):
                    _registry.update(rec.name, rec.ref, exit_status=code, ended=now_iso())
            self.idle.notify_all()

    def _kill_children(self) -> None:
        """SIGKILL every child (the fence deadline passed)."""
        with self.lock:
            pids = list(self.children)
        for pid in pids:
            kill(pid)

    # -- CRIU for self-dumping children -------------------------------------------------------

    def serve(self) -> None:
        """Accept self-dump requests from our children (in a daemon thread)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.bind(address(self.pid))
        sock.listen(8)
        self.listener = sock
        threading.Thread(target=self._accept_loop, args=(sock,), daemon=True).start()

    def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        """One connection from a child: a self-dump request, or the collection of its outcome
        (see ``_keeper_dump``). Refused, saying why, unless the peer is one of our children
        and the request is sound."""
        job = None
        with conn:
            conn.settimeout(_keeper_dump.HANDOVER_TIMEOUT)
            try:
                peer = _peer.identify(conn)
                with self.lock:
                    rec = self.children.get(peer.pid)
                # Read the request before any refusal: the client never writes to a closed
                # connection.
                data = _keeper_dump.receive(conn)
                fence = _keeper_fence.parse(data) if rec is None else False
                if fence is not False:
                    _keeper_fence.check_peer(peer)
                    self.fence.set(fence)
                    conn.send(b'{"ok": true}')
                    return
                if rec is None:
                    raise _errors.PermissionDeniedError(
                        f"process {peer.pid} is not a child of keeper {self.pid}; refused"
                    )
                req = _keeper_dump.parse_request(data)
                if isinstance(req, _keeper_dump.CollectRequest):
                    self._collect(conn, peer.pid)
                    return
                job = self._start_dump(conn, peer, rec, req)
            except (TorporError, OSError) as exc:
                print(f"{now_iso()} keeper {self.pid}: refused: {exc}", file=sys.stderr, flush=True)
                with contextlib.suppress(OSError):
                    conn.send(json.dumps({"ok": False, "error": str(exc)}).encode())
                return
        threading.Thread(target=self._after_swrk, args=(job, rec), daemon=True).start()

    def _start_dump(
        self,
        conn: socket.socket,
        peer: _peer.Peer,
        rec: ManagedProcess,
        req: _keeper_dump.DumpRequest,
    ) -> _keeper_dump.SelfDump:
        job = _keeper_dump.SelfDump(peer, rec, req)
        # One checkpoint of a process at a time, whoever asks (torpor checkpoint PID too):
        # held until the image is made (_after_swrk), or let go with this keeper.
        dump_lock = _locks.dumping(rec.ref)
        with self.lock:
            running = self.dumps.get(peer.pid)
            if running is not None and running.outcome is None:
                dump_lock.release()
                raise _errors.PermissionDeniedError(
                    f"a dump of process {peer.pid} is in flight; refused"
                )
            self.dumps[peer.pid] = job
            self.dump_locks[peer.pid] = dump_lock
            self.busy += 1
        try:
            job.prepare()
            if self.guard is None:
                self.guard = _peer.TreeGuard()
            job.launch(conn, CriuEngine().binary, self.guard)
        except BaseException:
            job.abort()
            with self.lock:
                self._release_dump_lock(peer.pid, dump_lock)
                self.busy -= 1
                self.idle.notify_all()
            raise
        return job

    def _release_dump_lock(self, pid: int, lock: Lock) -> None:
        if self.dump_locks.get(pid) is lock:
            del self.dump_locks[pid]
        lock.release()

    def _collect(self, conn: socket.socket, pid: int) -> None:
        with self.lock:
            job = self.dumps.get(pid)
        outcome = job.wait() if job is not None else None
        reply = outcome if outcome is not None else {"ok": True, "image": None, "log": None}
        conn.send(json.dumps(reply).encode())

    def _after_swrk(self, job: _keeper_dump.SelfDump, rec: ManagedProcess) -> None:
        try:
            outcome = job.finish()
            # Only a dump that ended the process is where the process went.
            if outcome.get("image") and not job.req.leave_running:
                with self.lock:
                    _registry.mark_checkpointed(rec.ref, Path(outcome["image"]))
            elif not outcome.get("ok"):
                print(f"{now_iso()} keeper {self.pid}: {outcome['error']}", file=sys.stderr)
        except Exception:
            traceback.print_exc()
        finally:
            with self.lock:
                if rec.pid not in self.children and self.dumps.get(rec.pid) is job:
                    del self.dumps[rec.pid]  # killed by the dump: nobody will collect
                lock = self.dump_locks.get(rec.pid)
                if lock is not None:
                    self._release_dump_lock(rec.pid, lock)
                self.busy -= 1
                self.idle.notify_all()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Keep this keeper alive while the block runs (a lazy copy's watch: its record and
        state must be written even if the copy it kills was the keeper's last child)."""
        with self.lock:
            self.busy += 1
        try:
            yield
        finally:
            with self.lock:
                self.busy -= 1
                self.idle.notify_all()

    def wait_idle(self) -> None:
        """Block until no child is left and no self-dump is in flight."""
        with self.lock:
            while self.children or self.busy:
                self.idle.wait()


# The names callers used before they were public (``_migrate._lazy_target``).
_start_time = child_start_time
_continue_tree = continue_tree


# -- fork a keeper from the CLI ------------------------------------------------------------------


class _Host:
    """This process offers itself as the next keeper (an agent worker does: it is already a
    detached session leader, so forking another keeper would only add latency)."""

    def __init__(self, warm: Connection | None, spare_log: SpareLog | None) -> None:
        self.warm = warm
        self.spare_log = spare_log
        self.keeper: Keeper | None = None


_host: _Host | None = None


def host_here(warm: Connection | None, spare_log: SpareLog | None = None) -> None:
    """Make this process the keeper of whatever the next :func:`spawn` starts, using ``warm``
    (a ``criu swrk`` child of this process, started with ``spare_log``'s fd) for its first
    restore. Once the command is done, the caller stays alive as that keeper while
    :func:`hosted_keeper` returns one."""
    global _host
    _host = _Host(warm, spare_log)


def hosted_keeper() -> Keeper | None:
    """The keeper this process became through :func:`host_here`, if :func:`spawn` used it."""
    return _host.keeper if _host is not None else None


def release_host() -> None:
    """Stop offering this process as a keeper; close the warm CRIU child if it was not used."""
    global _host
    if _host is not None and _host.keeper is None:
        if _host.warm is not None:
            _host.warm.close()
        if _host.spare_log is not None:
            _host.spare_log.close()
    _host = None


def _run_hosted(
    host: _Host, work: Callable[[Keeper], list[ManagedProcess]]
) -> list[ManagedProcess]:
    keeper = host.keeper = Keeper(host.warm, host.spare_log)
    host.warm = host.spare_log = None
    keeper.serve()
    # As in a forked keeper, a Ctrl-C must not stop the work halfway (copies restored but
    # never continued, an app started but not recorded): the command finishes, then reports.
    ignoring = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignoring else None
    try:
        return work(keeper)
    except TorporError:
        raise
    except Exception as exc:  # as a forked keeper reports it (see _keeper_reply)
        raise TorporError(f"keeper failed: {exc!r}") from exc
    finally:
        if ignoring:
            signal.signal(signal.SIGINT, previous)
        if keeper.warm is not None:  # not used (a ``run``): CRIU need not wait for us
            keeper.warm.close()
            keeper.warm = None
        if keeper.spare_log is not None:
            keeper.spare_log.close()
            keeper.spare_log = None


def spawn(work: Callable[[Keeper], list[ManagedProcess]]) -> list[ManagedProcess]:
    """Fork a keeper that runs ``work`` and stays behind as the parent of what it started
    (or, after :func:`host_here`, run ``work`` with this process as the keeper).

    Returns the records ``work`` produced, or raises the error it raised. Must be called before
    the calling process starts any thread.
    """
    if _host is not None and _host.keeper is None:
        return _run_hosted(_host, work)
    r, w = os.pipe2(os.O_CLOEXEC)

    def keeper() -> None:  # pragma: no cover - keeper side; exercised by integration tests
        os.close(r)
        _keeper_main(work, w)

    # Not our child: a long-running caller (the API) never collects zombie keepers.
    detached(keeper)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    # The keeper's first line names it (see _keeper_reply), then comes its reply.
    who, _, data = data.partition(b"\n")
    if not data:
        left = ""
        with contextlib.suppress(ValueError, OSError, TorporError):
            # Copies it restored but never finished are killed (stopped until verified, or
            # half of a --count): its records of them go too, so `torpor ps` stays true.
            killed = _registry.kill_unfinished(_keeper_reply.keeper_of(who))
            if killed:
                left = f" (killed what it had restored: {', '.join(killed)})"
        raise TorporError(
            f"the keeper died before reporting{left}; see the logs in {_paths.logs_dir()}",
            hint="retry the command",
        )
    return _keeper_reply.read_reply(data)


def _keeper_main(work: Callable[[Keeper], list[ManagedProcess]], report_w: int) -> None:
    code = 0
    try:
        os.write(report_w, _keeper_reply.first_line(os.getpid(), child_start_time(os.getpid())))
        # Detach from the terminal: a keeper outlives the CLI and must not hold its tty.
        log = os.open(
            _paths.logs_dir() / "keeper.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(devnull)
        os.close(log)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        keeper = Keeper()
        keeper.serve()
        try:
            procs = work(keeper)
        except BaseException as exc:
            os.write(report_w, _keeper_reply.error_reply(exc))
            code = 1
        else:
            os.write(report_w, _keeper_reply.ok_reply(procs))
        os.close(report_w)
        keeper.wait_idle()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)
