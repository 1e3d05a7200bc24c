"""An agent worker: takes one command from the launcher and runs the CLI on it.

A worker is forked by the master (``_master``), starts a ``criu swrk`` child ahead of time and
waits in ``accept()``. It tells the master when it takes a connection and when the command is
done (the master then forks its replacement). It runs the command as the client would have:
the client's argv, cwd, umask, rlimits, environment and stdin/stdout/stderr (received as fds).
It answers ``exit:CODE`` and lets go of the client's fds; if the command started managed
processes, the worker stays as their keeper, else it exits.
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

if TYPE_CHECKING:
    from torpor._engine import Connection

PROTOCOL = b"torpor-agent/1"
MAX_REQUEST = 1 << 20


@dataclass(frozen=True)
class Request:
    """A command handed over by the launcher (``bin/torpor``)."""

    argv: tuple[str, ...]
    cwd: bytes
    umask: int
    rlimits: tuple[tuple[int, int, int], ...]  # (resource, soft, hard)
    environ: dict[bytes, bytes]


class BadRequest(Exception):
    """A request this worker cannot read (another protocol version, a malformed packet)."""


def decode_request(packet: bytes) -> Request:
    """Parse the launcher's request packet (the format is in ``bin/torpor``'s docstring)."""
    fields = packet.split(b"\0")
    if fields[0] != PROTOCOL:
        raise BadRequest(f"protocol {fields[0][:40]!r}, expected {PROTOCOL!r}")
    try:
        cwd, umask, limits, argc = fields[1], int(fields[2], 8), fields[3], int(fields[4])
        rlimits = tuple(
            (int(res), int(soft), int(hard))
            for res, soft, hard in (lim.split(b":") for lim in limits.split(b",") if lim)
        )
        if argc < 0 or 5 + argc > len(fields):
            raise ValueError("argument count")
        argv = tuple(a.decode("utf-8", "surrogateescape") for a in fields[5 : 5 + argc])
        environ = dict(e.split(b"=", 1) for e in fields[5 + argc :] if b"=" in e)
    except (ValueError, IndexError) as exc:
        raise BadRequest(f"malformed request: {exc}") from exc
    return Request(argv, cwd, umask, rlimits, environ)


# -- one command ----------------------------------------------------------------------------


def work(listener: socket.socket, notes_fd: int, criu: str | None, log_fd: int) -> None:
    """The life of a worker after the fork: wait for a command, run it, stay as a keeper if it
    started managed processes. Never returns (ends with ``_exit``)."""
    code = 0
    try:
        from torpor._engine import Connection

        warm: Connection | None = None
        if criu:
            with contextlib.suppress(OSError):
                warm = Connection.spawn(criu)
        _warm_up()
        conn, _ = listener.accept()
        listener.close()
        with conn:
            _serve(conn, notes_fd, warm, log_fd)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _warm_up() -> None:
    """While idle, run what every command runs first. A fork shares the master's pages until
    it writes them, and merely using an object writes its refcount: the copies (~1 ms for
    argument parsing) are made now instead of during the command."""
    from torpor import _cli

    parser = _cli._prebuilt
    if parser is not None:
        with contextlib.suppress(SystemExit):
            parser.parse_args(["restore", "warm-up"])


def _serve(conn: socket.socket, notes_fd: int, warm: Connection | None, log_fd: int) -> None:
    from torpor._process import _keeper

    pid = os.getpid()
    os.write(notes_fd, b"taken %d\n" % pid)
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    uid = int.from_bytes(creds[4:8], sys.byteorder)
    packet, fds = _receive(conn)
    try:
        if uid != os.geteuid():
            return _decline(conn, f"uid {uid} is not this agent's")
        try:
            req = decode_request(packet)
        except BadRequest as exc:
            return _decline(conn, str(exc))
        if len(fds) != 3:
            return _decline(conn, f"{len(fds)} fds received, expected 3")
        try:
            os.chdir(req.cwd)
        except OSError as exc:
            return _decline(conn, f"cannot enter {req.cwd!r}: {exc.strerror}")
        _adopt_client(req, fds)
        fds = []  # now fds 0, 1, 2
        _keeper.host_here(warm)
        code = _run_cli(req.argv, conn)
        keeper = _keeper.hosted_keeper()
        _keeper.release_host()
        _let_go_of_client(log_fd)
        with contextlib.suppress(OSError):
            conn.send(b"exit:%d" % code)
    finally:
        for fd in fds:
            os.close(fd)
        # The master forks this worker's replacement now rather than at ``taken``: a fork and
        # a CRIU start on the other core would slow the command (a restore) by ~10 %.
        os.write(notes_fd, b"done %d\n" % pid)
        os.close(notes_fd)
    if keeper is not None:
        conn.close()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        keeper.wait_idle()


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    fd_space = socket.CMSG_SPACE(16 * 4)
    packet, ancdata, _, _ = conn.recvmsg(MAX_REQUEST, fd_space)
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += [int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, usable, 4)]
    return packet, fds


def _decline(conn: socket.socket, reason: str) -> None:
    print(f"agent worker {os.getpid()}: declined: {reason}", file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):
        conn.send(b"declined:" + reason.encode(errors="replace"))


def _adopt_client(req: Request, fds: list[int]) -> None:
    """Take on the client's process context: fds 0-2, umask, rlimits, environment."""
    os.umask(req.umask)
    for res, soft, hard in req.rlimits:
        with contextlib.suppress(OSError, ValueError):
            if resource.getrlimit(res) != (soft, hard):
                resource.setrlimit(res, (soft, hard))
    # Only the differences: each change is a putenv()/unsetenv() call.
    env = os.environb
    for key in [k for k in env if k not in req.environ]:
        del env[key]
    for key, value in req.environ.items():
        if env.get(key) != value:
            env[key] = value
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin, sys.stdout, sys.stderr = _text(0, "r"), _text(1, "w"), _text(2, "w")


def _text(fd: int, mode: str) -> io.TextIOWrapper:
    """A ``sys.std*`` stream on ``fd`` like the interpreter makes: buffered binary underneath
    (``sys.stdout.buffer`` writes whole), line-buffered on a terminal, utf-8."""
    tty = os.isatty(fd)
    raw = open(fd, mode + "b", closefd=False)  # noqa: SIM115 - kept as sys.std*
    return io.TextIOWrapper(
        raw,
        encoding="utf-8",
        errors="backslashreplace" if fd == 2 else "strict",
        line_buffering=tty,
        write_through=fd == 2,
    )


def _let_go_of_client(log_fd: int) -> None:
    """Flush and drop every reference to the client's fds (a keeper that held its stdout pipe
    would keep the client's reader waiting for EOF)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
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
        finally:
            with lock:
                # A Ctrl-C from now on must not hit what follows (a keeper's life).
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                state["running"] = False
    except KeyboardInterrupt:
        code = 130
    return code


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
