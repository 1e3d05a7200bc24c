"""Descriptor policies: what to do with a descriptor at checkpoint time, modelled on CRaC's
``jdk.crac.resource-policies``.

A rule matches descriptors by ``type`` (``file``, ``device``, ``tty``, ``pipe``, ``fifo``,
``socket``, ``anon`` or ``any``) and optionally ``path`` (a glob on the file or unix socket
path; ``*`` also matches ``/``), ``proto`` (``tcp`` matches tcp and tcp6; ``udp``, ``unix``...),
``state`` (``listen``, ``established``...), ``local`` and ``remote`` (globs on ``host:port``,
IPv6 in brackets). The first matching rule wins; a descriptor no rule matches is refused only
if it would break the restore (:func:`torpor._coord._fds.problem`). Actions:

``error``
    refuse the checkpoint (the default for problems; a rule can also forbid a harmless fd);
``ignore``
    leave the descriptor to CRIU, which may still fail the dump;
``close``
    put ``/dev/null`` on the descriptor before the dump. The number stays taken so nothing else
    reuses it under the application's file object; reads see EOF, writes vanish, socket calls
    fail with ``ENOTSOCK``. Final: the original after ``leave_running`` keeps ``/dev/null`` too;
``reopen``
    files: close before the dump, then open the same path with the same flags and seek to the
    same position after restore; listening TCP/UDP/unix sockets: close before the dump, then
    bind a new socket to the same address and ``dup2`` it onto the same descriptor number, so
    the socket object the application holds works on. Connections pending in the backlog are
    lost, and event loops that registered the old socket with epoll (asyncio) do not see the
    new one: re-create such servers in hooks instead.

Every ``ignore``/``close``/``reopen`` emits an :class:`FdPolicyWarning` unless the rule says
``warn = false``.

Rules come from, in this order: the ``fd_rules`` of a ``checkpoint()`` call,
:func:`add_fd_rules`, and the file named by ``TORPOR_FD_POLICY`` (TOML with ``[[rule]]`` tables,
or JSON: a list of rules or ``{"rule": [...]}``).
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import stat
import threading
import tomllib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .._errors import UsageError
from ._fds import FdInfo

TYPES = frozenset({"file", "device", "tty", "pipe", "fifo", "socket", "anon", "any"})
ACTIONS = frozenset({"error", "ignore", "close", "reopen"})
_O_NONBLOCK = 0o4000
_CREATION_FLAGS = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY


class FdPolicyWarning(UserWarning):
    """A descriptor policy closed, reopened or ignored a descriptor at a checkpoint."""


@dataclass(frozen=True)
class FdRule:
    """One descriptor policy rule (see the module docstring for the keys)."""

    type: str
    action: str = "error"
    path: str | None = None
    proto: str | None = None
    state: str | None = None
    local: str | None = None
    remote: str | None = None
    warn: bool = True

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise UsageError(
                f"fd rule: unknown type {self.type!r}",
                hint=f"use one of {', '.join(sorted(TYPES))}",
            )
        if self.action not in ACTIONS:
            raise UsageError(
                f"fd rule: unknown action {self.action!r}",
                hint=f"use one of {', '.join(sorted(ACTIONS))}",
            )
        if self.action == "reopen" and self.type not in ("file", "socket"):
            raise UsageError(
                f"fd rule: 'reopen' applies to files and listening sockets, not {self.type!r}"
            )
        socket_keys = (self.proto, self.state, self.local, self.remote)
        if self.type not in ("socket", "any") and any(k is not None for k in socket_keys):
            raise UsageError(
                f"fd rule: proto/state/local/remote only apply to sockets, not {self.type!r}"
            )

    def matches(self, info: FdInfo) -> bool:
        """Whether this rule selects ``info``."""
        if self.type != "any" and self.type != info.kind:
            return False
        if self.path is not None and not fnmatch.fnmatchcase(info.path or "", self.path):
            return False
        s = info.socket
        if s is None:
            return all(k is None for k in (self.proto, self.state, self.local, self.remote))
        if self.proto is not None and s.proto not in (self.proto, self.proto + "6"):
            return False
        if self.state is not None and s.state != self.state:
            return False
        if self.local is not None and not fnmatch.fnmatchcase(s.local, self.local):
            return False
        return self.remote is None or fnmatch.fnmatchcase(s.remote, self.remote)

    def __str__(self) -> str:
        keys = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "warn"]
        return "rule(" + ", ".join(k for k in keys if not k.endswith("=None")) + ")"


def rules_from_data(data: object, *, source: str) -> tuple[FdRule, ...]:
    """Rules from parsed TOML/JSON: a list of tables, or a table with a ``rule`` list."""
    if isinstance(data, Mapping):
        unknown = set(data) - {"rule"}
        if unknown:
            raise UsageError(
                f"{source}: unknown key(s) {', '.join(sorted(unknown))}", hint="use [[rule]] tables"
            )
        data = data.get("rule", [])
    if not isinstance(data, list):
        raise UsageError(f"{source}: expected a list of rules")
    known = {f.name for f in fields(FdRule)}
    rules = []
    for i, item in enumerate(data, 1):
        if not isinstance(item, Mapping):
            raise UsageError(f"{source}: rule {i} is not a table")
        extra = set(item) - known
        if extra:
            raise UsageError(
                f"{source}: rule {i} has unknown key(s) {', '.join(sorted(extra))}",
                hint=f"known keys: {', '.join(sorted(known))}",
            )
        try:
            rules.append(FdRule(**{str(k): v for k, v in item.items()}))
        except (UsageError, TypeError) as exc:
            raise UsageError(f"{source}: rule {i}: {exc}") from exc
    return tuple(rules)


def load_fd_policy(path: str | os.PathLike[str]) -> tuple[FdRule, ...]:
    """Read rules from a TOML (``[[rule]]`` tables) or JSON file."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read fd policy {p}: {exc.strerror}") from exc
    try:
        if p.suffix == ".json":
            data: Any = json.loads(text)
        else:
            data = tomllib.loads(text.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"fd policy {p} is malformed: {exc}") from exc
    return rules_from_data(data, source=str(p))


_api_rules: list[FdRule] = []
_api_lock = threading.Lock()
_env_cache: tuple[str, tuple[FdRule, ...]] | None = None


def add_fd_rules(*rules: FdRule) -> None:
    """Add process-wide rules, consulted after a call's own ``fd_rules`` and before the file
    named by ``TORPOR_FD_POLICY``."""
    with _api_lock:
        _api_rules.extend(rules)


def clear_fd_rules() -> None:
    """Drop the rules added with :func:`add_fd_rules`."""
    with _api_lock:
        _api_rules.clear()


def effective_rules(call_rules: Iterable[FdRule] = ()) -> tuple[FdRule, ...]:
    """The rules in force for one checkpoint, in matching order."""
    global _env_cache
    env = os.environ.get("TORPOR_FD_POLICY", "")
    if not env:
        from_env: tuple[FdRule, ...] = ()
    elif _env_cache is not None and _env_cache[0] == env:
        from_env = _env_cache[1]
    else:
        from_env = load_fd_policy(env)
        _env_cache = (env, from_env)
    with _api_lock:
        api = tuple(_api_rules)
    return (*call_rules, *api, *from_env)


@dataclass(frozen=True)
class Decision:
    """What a checkpoint does with one descriptor: the action, the rule that chose it (None
    for the defaults) and, for ``error``, why."""

    info: FdInfo
    action: str
    rule: FdRule | None = None
    reason: str | None = None


def decide(infos: Iterable[FdInfo], rules: Sequence[FdRule], problem: Any) -> list[Decision]:
    """One decision per descriptor that needs something done (or refused).

    ``problem(info) -> str | None`` says why a descriptor breaks the restore.
    """
    out = []
    for info in infos:
        rule = next((r for r in rules if r.matches(info)), None)
        why = problem(info)
        if rule is None:
            if why is not None:
                out.append(Decision(info, "error", None, why))
            continue
        if rule.action == "error":
            out.append(Decision(info, "error", rule, why or f"refused by {rule}"))
        elif rule.action == "reopen" and not _reopenable(info):
            out.append(
                Decision(
                    info,
                    "error",
                    rule,
                    "'reopen' applies to files on a path and to "
                    "listening or bound, unconnected sockets",
                )
            )
        else:
            out.append(Decision(info, rule.action, rule, why))
    return out


def _reopenable(info: FdInfo) -> bool:
    if info.kind == "file":
        return not info.deleted and info.path is not None and not info.path.startswith("/memfd:")
    s = info.socket
    if s is None:
        return False
    if s.proto == "unix":
        return s.state == "listen" and bool(s.local) and s.type != "dgram"
    return s.state in ("listen", "unconnected", "close") and not s.remote


class Reopener:
    """Closes (onto ``/dev/null``) and later reopens the descriptors a policy picked."""

    def __init__(self) -> None:
        self._pending: list[_Reopen] = []

    def apply(self, decisions: Iterable[Decision]) -> None:
        """Carry out ``close``/``reopen``/``ignore`` decisions (before the dump)."""
        for d in decisions:
            if d.action == "error":
                continue
            if d.rule is not None and d.rule.warn:
                warnings.warn(
                    f"torpor: {d.action} {d.info.describe()} at checkpoint ({d.rule})",
                    FdPolicyWarning,
                    stacklevel=2,
                )
            if d.action == "reopen":
                self._pending.append(_Reopen.capture(d.info))
            if d.action in ("close", "reopen"):
                _blank(d.info.fd)

    def restore(self) -> list[Exception]:
        """Reopen what was closed for reopening; return the failures (each noted with the
        descriptor)."""
        failures: list[Exception] = []
        pending, self._pending = self._pending, []
        for item in pending:
            try:
                item.reopen()
            except OSError as exc:
                exc.add_note(f"reopening fd {item.fd} ({item.what}) after restore")
                failures.append(exc)
        return failures


def _blank(fd: int) -> None:
    inheritable = os.get_inheritable(fd)
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, fd, inheritable=inheritable)
    finally:
        os.close(null)


@dataclass(frozen=True)
class _Reopen:
    fd: int
    what: str
    inheritable: bool
    path: str | None = None
    flags: int = 0
    pos: int = 0
    family: int = 0
    type: int = 0
    proto: int = 0
    address: Any = None
    listening: bool = False
    options: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def capture(cls, info: FdInfo) -> _Reopen:
        inheritable = os.get_inheritable(info.fd)
        if info.kind == "file":
            return cls(
                info.fd,
                info.describe(),
                inheritable,
                path=info.path,
                flags=info.flags,
                pos=info.pos,
            )
        with socket.socket(fileno=os.dup(info.fd)) as s:
            options = []
            for level, opt in _socket_options(s.family):
                try:
                    options.append((level, opt, s.getsockopt(level, opt)))
                except OSError:
                    continue
            return cls(
                info.fd,
                info.describe(),
                inheritable,
                flags=info.flags,
                family=s.family,
                type=s.type,
                proto=s.proto,
                address=s.getsockname(),
                listening=info.socket is not None and info.socket.state == "listen",
                options=tuple(options),
            )

    def reopen(self) -> None:
        if self.path is not None:
            new = os.open(self.path, self.flags & ~_CREATION_FLAGS)
            try:
                if not self.flags & os.O_APPEND:
                    os.lseek(new, self.pos, os.SEEK_SET)
                os.dup2(new, self.fd, inheritable=self.inheritable)
            finally:
                os.close(new)
            return
        s = socket.socket(self.family, self.type, self.proto)
        try:
            for level, opt, value in self.options:
                s.setsockopt(level, opt, value)
            if isinstance(self.address, str) and self.address:
                _unlink_stale_socket(self.address)
            s.bind(self.address)
            if self.listening:
                s.listen(socket.SOMAXCONN)
            s.setblocking(not self.flags & _O_NONBLOCK)
            os.dup2(s.fileno(), self.fd, inheritable=self.inheritable)
        finally:
            s.close()


def _socket_options(family: int) -> list[tuple[int, int]]:
    opts = [(socket.SOL_SOCKET, socket.SO_REUSEADDR), (socket.SOL_SOCKET, socket.SO_REUSEPORT)]
    if family == socket.AF_INET6:
        opts.append((socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    return opts


def _unlink_stale_socket(path: str) -> None:
    """A closed unix listener leaves its socket file behind; binding again needs it gone."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
