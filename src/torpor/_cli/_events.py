"""``torpor events``, ``torpor logs``: what happened to a supervised process, and its output.

``torpor events NAME`` shows the newest 50 events (``-n N``, ``-n all``) as a table: for a
checkpoint its duration, how long the app was frozen and the bytes it added to the pool; for a
crash the signal or exit code; for a restore the image and whether it fell back to an older
one; for a give-up why. ``--json`` prints them as written.

``torpor logs NAME`` prints the last 200 lines (``-n LINES``, ``-n all``) of the app's stdout
and stderr (the log the keeper appends to, for the original and for every copy restored under
that name); ``-f`` then follows it until Ctrl-C, across a log removed and made again. The log
is read as root: opened ``O_NOFOLLOW`` and refused unless a regular file owned by us or root
that no one else can write. Its bytes are the app's own, printed as they are (as ``tail``).
"""

from __future__ import annotations

import argparse
import errno
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from .._errors import NotFoundError, TorporError, UnsafePathError, UsageError
from ._app import App, human_bytes, human_duration

DEFAULT_EVENTS = 50
DEFAULT_LINES = 200
_FOLLOW_POLL = 0.2  # seconds between looks at a followed log
_CHUNK = 1 << 16


def register(sub: Any) -> None:
    """Add the commands."""
    p = sub.add_parser("events", help="what happened to a supervised process")
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "-n",
        dest="count",
        type=_count,
        default=DEFAULT_EVENTS,
        metavar="N",
        help=f"the newest N events (default {DEFAULT_EVENTS}; 'all' for every one)",
    )
    p.add_argument("--json", action="store_true", help="output JSON")
    p.set_defaults(handler=_events)

    p = sub.add_parser("logs", help="the output of a managed process")
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "-n",
        dest="count",
        type=_count,
        default=DEFAULT_LINES,
        metavar="LINES",
        help=f"the last LINES lines (default {DEFAULT_LINES}; 'all' for the whole log)",
    )
    p.add_argument("-f", "--follow", action="store_true", help="then print new lines as they come")
    p.set_defaults(handler=_logs)


def _count(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (a number, or 'all')")
    return int(text)


# -- events -----------------------------------------------------------------------------------


def _events(app: App, args: argparse.Namespace) -> int:
    from .._supervise import _events

    problems: list[str] = []
    events = _events.read(args.name, limit=args.count, skipped=problems)
    for problem in problems:
        app.warn(problem)
    if not events and not _known(args.name):
        raise NotFoundError(
            f"no events of {args.name!r}: it is not a managed process",
            hint="`torpor ps -a` lists managed processes",
        )
    if args.json:
        app.json([{"time": e.time, "kind": e.kind, **e.fields} for e in events])
        return 0
    if not events:
        app.info(f"no events of {args.name} yet")
        return 0
    rows = [(_time(e.time), e.kind, details(e.kind, e.fields)) for e in events]
    app.table(("TIME", "EVENT", "DETAILS"), rows)
    return 0


def _known(name: str) -> bool:
    """Whether ``name`` is a managed process (a record, ended or not) or a supervised one."""
    from .._process import _registry
    from .._supervise import _state

    try:
        _registry.load(name)
        return True
    except NotFoundError:
        pass
    except TorporError:
        return True  # a record there, untrusted: a name known, not a mistyped one
    try:
        return _state.read(name) is not None
    except TorporError:
        return True


def _time(iso: str) -> str:
    """An event's time in local time, to the second."""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return iso


def details(kind: str, fields: Mapping[str, Any]) -> str:
    """The DETAILS cell of an event: what the supervisor writes for its kind, in words, then
    any other field as ``key=value``."""
    rest = dict(fields)
    parts: list[str] = []

    def take(key: str) -> Any:
        return rest.pop(key, None)

    describe = _DESCRIBE.get(kind)
    if describe is not None:
        parts.extend(p for p in describe(take) if p)
    parts.extend(f"{k}={_value(v)}" for k, v in rest.items() if v is not None)
    return ", ".join(parts)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _seconds(v: Any) -> str | None:
    if not _number(v):
        return None
    if v < 60:
        return f"{v:.2f}s"
    return human_duration(v)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def _checkpoint(take: Callable[[str], Any]) -> list[str | None]:
    image, duration = take("image"), _seconds(take("duration_s"))
    frozen, new_bytes, size = take("frozen_ms"), take("new_bytes"), take("bytes")
    return [
        f"{image}" if image else None,
        f"in {duration}" if duration else None,
        f"frozen {frozen:.{1 if frozen < 10 else 0}f} ms" if _number(frozen) else None,
        f"{human_bytes(new_bytes)} new" if _number(new_bytes) else None,
        f"{human_bytes(size)} in all" if _number(size) else None,
    ]


def _failed(take: Callable[[str], Any]) -> list[str | None]:
    image, error = take("image"), take("error")
    return [f"{image}" if image else None, f"{error}" if error else None]


def _crash(take: Callable[[str], Any]) -> list[str | None]:
    sig, code, uptime = take("signal"), take("exit_code"), _seconds(take("uptime_s"))
    if isinstance(sig, int) and not isinstance(sig, bool):
        how = f"killed by {_signal_name(sig)}"
    elif isinstance(code, int) and not isinstance(code, bool):
        how = f"exited {code}"
    else:
        how = "ended, status unknown"
    return [how, f"after {uptime}" if uptime else None]


def _signal_name(sig: int) -> str:
    import signal

    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _restore(take: Callable[[str], Any]) -> list[str | None]:
    image, fallback, duration = take("image"), take("fallback"), _seconds(take("duration_s"))
    source = f"from {image}" if image else None
    if fallback is True:
        source = f"{source or 'from an older checkpoint'} (fallback: newer ones failed)"
    return [source, f"in {duration}" if duration else None]


def _give_up(take: Callable[[str], Any]) -> list[str | None]:
    reason = take("reason")
    return [f"{reason}" if reason else None]


_DESCRIBE: dict[str, Callable[[Callable[[str], Any]], list[str | None]]] = {
    "checkpoint": _checkpoint,
    "checkpoint-failed": _failed,
    "crash": _crash,
    "restore": _restore,
    "restore-failed": _failed,
    "skipped": _failed,
    "give-up": _give_up,
}


# -- logs -------------------------------------------------------------------------------------


def _logs(app: App, args: argparse.Namespace) -> int:
    path = log_path(args.name)
    log = _Log(path)
    try:
        if not log.open():
            if not args.follow or not _known(args.name):
                raise NotFoundError(
                    f"no log of {args.name!r} ({path})",
                    hint="`torpor ps -a` lists managed processes (started with --no-log: none)",
                )
        else:
            _write(app, log.tail(args.count))
        if args.follow:
            try:
                log.follow(lambda data: _write(app, data))
            except KeyboardInterrupt:
                return 0
    except BrokenPipeError:
        return 0  # `torpor logs N | head`: the reader has seen enough
    finally:
        log.close()
    return 0


def _write(app: App, data: bytes) -> None:
    if not data:
        return
    buffer = getattr(app.stdout, "buffer", None)
    if buffer is not None:
        app.stdout.flush()
        buffer.write(data)
        buffer.flush()
    else:
        app.stdout.write(data.decode(errors="replace"))
        app.stdout.flush()


def log_path(name: str) -> Path:
    """Where the output of the managed process ``name`` goes: its record's log (a ``--log``
    the user chose), else ``<home>/logs/NAME.log``."""
    from .. import _paths
    from .._images._store import check_name
    from .._process import _registry

    check_name(name, what="process name")
    if name in _registry.RESERVED_NAMES:
        raise UsageError(f"{name!r} is torpor's own log, not a process's", hint="torpor ps -a")
    try:
        rec = _registry.load(name)
    except NotFoundError:
        rec = None
    if rec is not None and rec.log_path:
        return Path(rec.log_path)
    return _paths.logs_dir() / f"{name}.log"


class _Log:
    """A log file read as root: opened relative to its checked directory with ``O_NOFOLLOW``
    (only the logs directory is checked; a ``--log`` elsewhere is where the user asked), and
    refused unless a regular file owned by us or root that no one else can write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.offset = 0

    def open(self) -> bool:
        """Open the log (from its start); whether there is one."""
        from .. import _paths, _safe

        logs = _paths.logs_dir()
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            if self.path.parent == logs:
                dir_fd = _safe.open_dir(logs)
                try:
                    _safe.check_private(logs, what="logs directory", fd=dir_fd)
                    fd = os.open(self.path.name, flags, dir_fd=dir_fd)
                finally:
                    os.close(dir_fd)
            else:
                fd = os.open(self.path, flags)
        except FileNotFoundError:
            return False
        except OSError as exc:
            why = "is a symlink" if exc.errno == errno.ELOOP else f"cannot be read ({exc})"
            raise self._refused(why) from exc
        try:
            problem = _safe.private_file_problem(os.fstat(fd))
            if problem is not None:
                raise self._refused(problem)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        self.close()
        self.fd, self.offset = fd, 0
        return True

    def _refused(self, problem: str | None) -> UnsafePathError:
        return UnsafePathError(
            f"log {self.path} {problem}; refused",
            path=self.path,
            hint=f"torpor did not make it: remove {self.path}",
        )

    def close(self) -> None:
        """Close the log (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def tail(self, lines: int | None) -> bytes:
        """The last ``lines`` lines (every line: None); reading continues after them."""
        assert self.fd is not None
        size = os.fstat(self.fd).st_size
        start = 0 if lines is None else self._start_of_last(lines, size)
        self.offset = start
        return self.read_new()

    def _start_of_last(self, lines: int, size: int) -> int:
        """Where the last ``lines`` lines of the first ``size`` bytes begin."""
        assert self.fd is not None
        if lines == 0:
            return size
        # The file's final newline ends its last line: the search starts before it.
        end = size - 1 if size and os.pread(self.fd, 1, size - 1) == b"\n" else size
        pos, seen = end, 0
        while pos > 0:
            step = min(_CHUNK, pos)
            pos -= step
            block = os.pread(self.fd, step, pos)
            i = len(block)
            while (i := block.rfind(b"\n", 0, i)) != -1:
                seen += 1
                if seen == lines:
                    return pos + i + 1
        return 0

    def read_new(self) -> bytes:
        """Everything written since the last read (at most a few MiB at a time)."""
        assert self.fd is not None
        chunks = []
        while chunk := os.pread(self.fd, _CHUNK, self.offset):
            chunks.append(chunk)
            self.offset += len(chunk)
            if len(chunks) >= 64:
                break
        return b"".join(chunks)

    def follow(self, emit: Callable[[bytes], None]) -> None:
        """Print what is appended, for ever: a log truncated is read from its start again, one
        removed or replaced (renamed over) is drained and the new one followed."""
        while True:
            if self.fd is not None:
                data = self.read_new()
                if data:
                    emit(data)
                    continue
                if os.fstat(self.fd).st_size < self.offset:
                    self.offset = 0  # truncated
                    continue
                if self._replaced():
                    # Drain what the old file got after our last read, then follow the new one.
                    rest = self.read_new()
                    if rest:
                        emit(rest)
                    self.open()
                    continue
            elif self.open():
                continue
            time.sleep(_FOLLOW_POLL)

    def _replaced(self) -> bool:
        assert self.fd is not None
        try:
            there = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False  # removed: keep the old one until a new one appears
        ours = os.fstat(self.fd)
        return (there.st_dev, there.st_ino) != (ours.st_dev, ours.st_ino)
