"""An agent worker: takes one command from the launcher and runs the CLI on it.

A worker is forked by the master (``_master``), starts a ``criu swrk`` child ahead of time and
waits in ``accept()``. On a connection it tells the master (``taken``), checks the client
(``_admit``: confined as the agent is, held by a pidfd), says ``ready``, reads the request
(within ``RECEIVE_TIMEOUT``) and runs the command as the client would have: in the client's
cgroups, with its argv, working directory, umask, rlimits, environment and
stdin/stdout/stderr (the directory and streams received as fds). It answers ``exit:CODE``, lets
go of the client's fds and tells the master (``done``: the master forks its replacement then).
If the command started managed processes, the worker stays as their keeper, else it exits.
A request it cannot run exactly as the client would is declined before anything runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
import socket
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._agent_status import launcher_dir
from . import _admit
from ._admit import Declined

if TYPE_CHECKING:
    from torpor._engine import Connection
    from torpor._process._logs import SpareLog

PROTOCOL = b"torpor-agent/3"
MAX_REQUEST = 1 << 20
# Seconds a launcher has to send its request once told ``ready`` (it has it ready before it
# connects): a silent connection must not hold a worker.
RECEIVE_TIMEOUT = 10.0
# The launcher's fds 0, 1, 2 and its working directory (O_PATH).
REQUEST_FDS = 4


@dataclass(frozen=True)
class Request:
    """A command handed over by a launcher (``bin/torpor-py`` describes the format)."""

    install: bytes  # the launcher's directory: the agent must run the same installation
    argv: tuple[str, ...]
    cwd: bytes
    umask: int
    rlimits: tuple[tuple[int, int, int], ...]  # (resource, soft, hard); -1 is unlimited
    environ: dict[bytes, bytes]


class BadRequest(Exception):
    """A request this worker cannot read (another protocol version, a malformed packet)."""


def decode_request(packet: bytes) -> Request:
    """Parse a launcher's request packet."""
    fields = packet.split(b"\0")
    if fields[0] != PROTOCOL:
        raise BadRequest(f"protocol {fields[0][:40]!r}, expected {PROTOCOL!r}")
    try:
        install, cwd, limits = fields[1], fields[2], fields[4]
        umask, argc = int(fields[3], 8), int(fields[5])
        if not 0 <= umask <= 0o777:
            raise ValueError(f"umask {umask:o}")
        rlimits = tuple(
            _rlimit(int(res), int(soft), int(hard))
            for res, soft, hard in (lim.split(b":") for lim in limits.split(b",") if lim)
        )
        if argc < 0 or 6 + argc > len(fields):
            raise ValueError("argument count")
        argv = tuple(a.decode("utf-8", "surrogateescape") for a in fields[6 : 6 + argc])
        # putenv() refuses an empty name: such an entry could not be set in-process either.
        environ = dict(e.split(b"=", 1) for e in fields[6 + argc :] if b"=" in e[1:])
    except (ValueError, IndexError) as exc:
        raise BadRequest(f"malformed request: {exc}") from exc
    return Request(install, argv, cwd, umask, rlimits, environ)


# Linux's RLIM_NLIMITS (the resource module does not export it); the launchers send these 16.
_RLIMIT_NLIMITS = 16


def _rlimit(res: int, soft: int, hard: int) -> tuple[int, int, int]:
    """A resource limit as setrlimit takes it, or ValueError: a resource this kernel has, and
    limits that are unlimited (-1) or fit the kernel's rlim_t."""
    if not 0 <= res < _RLIMIT_NLIMITS:
        raise ValueError(f"resource {res}")
    for value in (soft, hard):
        if not (value == resource.RLIM_INFINITY or 0 <= value < 2**63):
            raise ValueError(f"resource limit {value}")
    return res, soft, hard


@dataclass(frozen=True)
class AgentContext:
    """What a request must match to run here as it would in the client."""

    install: bytes  # the launchers' directory of the installation the agent runs
    criu_env: bytes | None  # the agent's TORPOR_CRIU: CRIU was found (and started) with it

    @classmethod
    def current(cls, install: str | None = None) -> AgentContext:
        """The context of this (the master's) process."""
        return cls(os.fsencode(install or launcher_dir()), os.environb.get(b"TORPOR_CRIU"))

    def mismatch(self, req: Request) -> str | None:
        """Why ``req`` cannot run here as in its client, or None."""
        if os.fsencode(os.path.realpath(req.install)) != self.install:
            return f"launcher from {req.install!r}, agent runs {self.install!r}"
        if req.environ.get(b"TORPOR_CRIU") != self.criu_env:
            return "TORPOR_CRIU differs from the agent's"
        return None


# -- one command ----------------------------------------------------------------------------


def work(
    listener: socket.socket, notes_fd: int, criu: str | None, log_fd: int, ctx: AgentContext
) -> None:
    """The life of a worker after the fork: wait for a command, run it, stay as a keeper if it
    started managed processes. Never returns (ends with ``_exit``)."""
    code = 0
    spare = None
    try:
        warm, spare = _start_criu(criu) if criu else (None, None)
        _warm_up()
        try:
            conn, _ = listener.accept()
        except OSError:  # the master shut the listener down (stopping, re-executing)
            return
        set_parent_death_signal(0)  # from now on we outlive the master, as keepers must
        listener.close()
        _note(notes_fd, b"taken")
        with conn:
            _serve(conn, notes_fd, warm, spare, log_fd, ctx)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        if spare is not None:  # unused (a command that restored nothing): removed
            with contextlib.suppress(OSError):
                spare.close()
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _start_criu(criu: str) -> tuple[Connection | None, SpareLog | None]:
    """A ``criu swrk`` for the next command's first restore, and the spare log it holds: a
    restored copy's log must be an fd of CRIU's own (``inherit_fd``), so the CRIU started now
    is given an unnamed log now, which that restore names as the copy's log. Either may be
    None (no CRIU could be started; no spare could be made: the restore then starts a CRIU
    with the log it opens)."""
    from torpor._engine import Connection
    from torpor._process._logs import SpareLog

    spare = SpareLog.make()
    try:
        return Connection.spawn(criu, (spare.fd,) if spare else (), restoring=True), spare
    except OSError:
        if spare is not None:
            spare.close()
        return None, None


def set_parent_death_signal(sig: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, sig)``: ``sig`` when the parent (the master) dies; 0 clears."""
    import ctypes

    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _note(notes_fd: int, what: bytes) -> None:
    """Tell the master; it may be gone (stopped, re-executing), which must not end us."""
    with contextlib.suppress(OSError):
        os.write(notes_fd, b"%s %d\n" % (what, os.getpid()))


_own_confinement: dict[str, str] = {}


def _warm_up() -> None:
    """While idle, rehearse what a restore runs before CRIU starts. A fork shares the
    master's pages until it writes them, and merely using an object writes its refcount: the
    copies (~1 ms on a restore's path) are made now instead of during the command."""
    import json
    from dataclasses import asdict

    from torpor import _cli
    from torpor._engine import RestoreOptions
    from torpor._process._registry import ManagedProcess
    from torpor._proto import criu_rpc_pb2 as pb

    _own_confinement.update(_admit.confinement(os.getpid()))
    parser = _cli._prebuilt
    if parser is not None:
        with contextlib.suppress(SystemExit):
            parser.parse_args(["restore", "warm-up"])
    RestoreOptions()
    opts = pb.Opts(images_dir_fd=-1, work_dir_fd=-1, log_file="warm-up.log", rst_sibling=True)
    pb.Req(type=pb.RESTORE, opts=opts).SerializeToString()
    rec = ManagedProcess(
        name="warm-up", pid=1, start_time=1, keeper_pid=1, command=("x",), started="-"
    )
    json.loads(json.dumps(asdict(rec), indent=2, sort_keys=True))


def _serve(
    conn: socket.socket,
    notes_fd: int,
    warm: Connection | None,
    spare: SpareLog | None,
    log_fd: int,
    ctx: AgentContext,
) -> None:
    from torpor._lazy import _prestart
    from torpor._process import _keeper

    keeper = None
    fds: list[int] = []
    client = None
    try:
        # Checked before `ready`: the client is held by a pidfd while it is judged, so a pid
        # it left behind (and another process reused) is never what is judged.
        try:
            client = _admit.Client(conn)
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            uid = int.from_bytes(creds[4:8], sys.byteorder)
            _admit.check(client, uid, _own_confinement or _admit.confinement(os.getpid()))
        except Declined as exc:
            return _decline(conn, str(exc))
        conn.send(b"ready")  # the launcher sends its request only to a worker that has it
        try:
            packet, fds = _receive(conn)
            _note(notes_fd, b"request")  # the master may fork for the next connection
            req = _request(packet, fds, ctx)
        except Declined as exc:
            return _decline(conn, str(exc))
        try:
            os.fchdir(fds[3])  # the directory itself: a path could be renamed under us
            _adopt_context(req, client, warm)
        except (OSError, ValueError) as exc:
            return _decline(conn, f"cannot take on the client's context: {exc}")
        except Declined as exc:
            return _decline(conn, str(exc))
        os.close(fds.pop())
        _adopt_stdio(fds)
        fds = []  # now our fds 0, 1, 2
        client.close()
        client = None
        _keeper.host_here(warm, spare)
        _prestart.allow()  # the command's lazy-pages daemon may be started by the command
        code = _run_cli(req.argv, conn)
        _prestart.allow(False)
        keeper = _keeper.hosted_keeper()
        _let_go_of_client(log_fd)
        with contextlib.suppress(OSError):
            conn.send(b"exit:%d" % code)
    finally:
        for fd in fds:
            os.close(fd)
        if client is not None:
            client.close()
        # The master forks this worker's replacement now rather than at ``taken``: a fork and
        # a CRIU start on the other core would slow the command (a restore) by ~10 %.
        _note(notes_fd, b"done")
        with contextlib.suppress(OSError):
            os.close(notes_fd)
        _keeper.release_host()  # after the answer: an unused warm CRIU is waited for here
    if keeper is not None:
        conn.close()
        keeper.wait_idle()


def _request(packet: bytes, fds: list[int], ctx: AgentContext) -> Request:
    """The request, if it may run here; else :class:`Declined` says why."""
    try:
        req = decode_request(packet)
    except BadRequest as exc:
        raise Declined(str(exc)) from exc
    if len(fds) != REQUEST_FDS:
        raise Declined(f"{len(fds)} fds received, expected {REQUEST_FDS}")
    reason = ctx.mismatch(req)
    if reason is not None:
        raise Declined(reason)
    return req


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The request packet and its fds; :class:`Declined` if none comes in time, or it was cut
    (a packet or fds beyond what is received here: running what is left would run another
    command than the client's)."""
    fd_space = socket.CMSG_SPACE(16 * 4)
    conn.settimeout(RECEIVE_TIMEOUT)
    try:
        packet, ancdata, flags, _ = conn.recvmsg(MAX_REQUEST, fd_space)
    except TimeoutError as exc:
        raise Declined(f"no request within {RECEIVE_TIMEOUT:g} s") from exc
    except OSError as exc:
        raise Declined(f"cannot receive the request: {exc}") from exc
    finally:
        conn.settimeout(None)
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += [int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, usable, 4)]
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        what = "request" if flags & socket.MSG_TRUNC else "fds"
        raise Declined(f"the {what} did not fit (a request is at most {MAX_REQUEST} bytes)")
    return packet, fds


def _decline(conn: socket.socket, reason: str) -> None:
    print(f"agent worker {os.getpid()}: declined: {reason}", file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):
        conn.send(b"declined:" + reason.encode(errors="replace"))


def _adopt_context(req: Request, client: _admit.Client, warm: Connection | None) -> None:
    """Take on the client's cgroups, umask, resource limits, environment, CPU affinity and
    niceness (raises if one of them cannot be had: the command would not run as in the
    client)."""
    criu = warm.proc.pid if warm is not None and warm.proc is not None else None
    _admit.join_cgroups(client, [os.getpid()] + ([criu] if criu is not None else []))
    os.umask(req.umask)
    cpus = client.verified(os.sched_getaffinity(client.pid))
    if cpus != os.sched_getaffinity(0):
        os.sched_setaffinity(0, cpus)
    nice = client.verified(os.getpriority(os.PRIO_PROCESS, client.pid))
    if nice != os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    for res, soft, hard in req.rlimits:
        if resource.getrlimit(res) != (soft, hard):
            resource.setrlimit(res, (soft, hard))
    # Only the differences: each change is a putenv()/unsetenv() call.
    env = os.environb
    for key in [k for k in env if k not in req.environ]:
        del env[key]
    for key, value in req.environ.items():
        if env.get(key) != value:
            env[key] = value


def _adopt_stdio(fds: list[int]) -> None:
    """The client's stdin/stdout/stderr become ours (fds 0-2 and ``sys.std*``)."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin, sys.stdout, sys.stderr = _text(0, "r"), _text(1, "w"), _text(2, "w")


def _text(fd: int, mode: str) -> io.TextIOWrapper:
    """A ``sys.std*`` stream on ``fd`` like the interpreter makes: buffered binary underneath
    (``sys.stdout.buffer`` writes whole), line-buffered on a terminal, in ``PYTHONIOENCODING``
    (else utf-8)."""
    tty = os.isatty(fd)
    encoding, _, errors = os.environ.get("PYTHONIOENCODING", "").partition(":")
    raw = open(fd, mode + "b", closefd=False)  # noqa: SIM115 - kept as sys.std*
    return io.TextIOWrapper(
        raw,
        encoding=encoding or "utf-8",
        errors=errors or ("backslashreplace" if fd == 2 else "strict"),
        line_buffering=tty,
        write_through=fd == 2,
    )


def _let_go_of_client(log_fd: int) -> None:
    """Flush and drop every reference to the client's fds (a keeper that held its stdout pipe
    would keep the client's reader waiting for EOF)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
    except OSError:  # the client's devices cgroup, which we joined, may deny it
        devnull = os.dup(log_fd)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    sys.stdin, sys.stdout, sys.stderr = _text(0, "r"), _text(1, "w"), _text(2, "w")


def _run_cli(argv: tuple[str, ...], conn: socket.socket) -> int:
    """``torpor._cli.main(argv)``, with the client's Ctrl-C delivered as SIGINT."""
    from torpor._cli import main

    state = {"running": True}
    lock = threading.Lock()
    main_thread = threading.main_thread().ident
    assert main_thread is not None

    def watch() -> None:
        # Every signal is the main thread's (SIGINT must interrupt the command, not us).
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            try:
                msg = conn.recv(64)
            except OSError:
                msg = b""
            with lock:
                if not state["running"]:
                    return
                if msg == b"interrupt" or not msg:  # Ctrl-C, or the client is gone
                    signal.pthread_kill(main_thread, signal.SIGINT)
            if not msg:
                return

    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=watch, daemon=True).start()
    try:
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except KeyboardInterrupt:
            print("torpor: interrupted", file=sys.stderr)
            code = 130
        except BaseException:
            traceback.print_exc()
            code = 70
    except KeyboardInterrupt:  # in an except clause above
        code = 130
    while True:
        # A Ctrl-C from now on must not hit what follows (a keeper's life). One that arrives
        # while we get there is raised here: try again (the command's code stands).
        try:
            with lock:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                state["running"] = False
            return code
        except KeyboardInterrupt:
            continue


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
