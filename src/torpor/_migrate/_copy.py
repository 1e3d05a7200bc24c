"""``torpor migrate NAME --to HOST:PORT --mode copy``: the source's side, and the image's wire
format that both sides share.

The order, and why the process is never lost:

1. Connect over the channel (:mod:`._channel`: both hosts must trust each other) and send the
   pre-flight facts (:mod:`._preflight`). A refusal, or a channel that cannot be opened, ends
   the migration here: nothing was frozen.
2. Dump the process with CRIU, answering its notifications (``notify_scripts``). At
   ``post-dump`` CRIU holds the tree frozen and waits for our answer; while it waits, the
   image's files go to the target whole (``image`` message, then each file's bytes as ``D``
   frames, then their SHA-256 in a ``hashes`` message, hashed on both sides as they pass), and
   the target verifies them and restores the process under the same name. Without a base the
   memory pages have gone before that, while CRIU dumped them, to a page server on the target
   (:mod:`._pagestream`): only the rest of the image is sent at ``post-dump``.
3. Only when the target reports ``running`` do we answer ``true``: CRIU then kills the
   original. Anything else before that (a refusal, a failed restore, the link cut, the target
   dead, no answer within the timeout) is answered ``false``: CRIU thaws the tree and the
   original runs on, unchanged. The target is then told ``abort`` (it kills a copy it may have
   restored); after a commit it is told ``done``, and so it is when the dump fails with the
   original gone all the same (CRIU killed it, then failed before returning): the copy there
   is then all there is of the process and must run on.

Against a base (:mod:`._dedup`, :mod:`._dedup_source`): the pre-flight names the images the
process came from or went to; if the target holds one it answers with that image's chunk ids,
and after the dump each file goes as plans of chunks (literal, zero page, or "base file F from
chunk S"), so that only what the target lacks crosses. Without a base nothing changes: whole
files, and nothing hashed per chunk inside the freeze.

Connections and addresses (docs/migration.md): the tree's TCP connections imply
``tcp_established`` (CRIU then locks them with nftables); one on an address that does not move
is refused before the freeze. The service addresses (the record's, and ``--address``) go in
the pre-flight message; the target brings them up behind a lock of its own before it restores
(:mod:`._netlock`). After the commit the source takes them down and deletes the lock CRIU
leaves after a dump that killed the tree; after a rollback it announces them again.

The window that is left: between the target's ``running`` and CRIU's kill both copies exist,
for the time one message takes; a source that dies exactly there may leave CRIU to thaw the
original (two copies). Fencing that (the target restoring stopped until the source's kill is
confirmed) needs the keeper to leave a copy stopped, which it cannot yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _paths
from .._engine import CriuEngine, DumpOptions, NotifyEvent, criu_version
from .._errors import DumpError, TorporError
from .._images._stats import read_dump_stats_at
from .._process import _locks, _registry
from .._process._proc import ProcRef, facts
from . import _address, _dedup, _leftovers, _netlock, _pagestream, _preflight
from ._channel import ChannelError, Conn, connect
from ._relay import RelayHandle
from ._send import MigrationError as MigrationError  # re-exported: where callers look for it
from ._send import MigrationRefusedError as MigrationRefusedError
from ._send import addresses_to_move, preflight, reply_number, transfer_image

if TYPE_CHECKING:
    from . import _dedup_source

DEFAULT_TIMEOUT = 120.0  # seconds the target may take to answer (receive, verify, restore)
# Tests only: a path created once the target reports the copy running, after which the source
# waits (before answering CRIU), so a test can kill it in the window of two copies.
_SOURCE_HOLD_ENV = "TORPOR_TEST_MIGRATE_SOURCE_HOLD"
_CONTINUE_TIMEOUT = 10.0  # seconds a fenced copy's "continued" may take (for the summary)
# Set: the pages are written here and sent after the dump, even to a target that takes a
# stream (tests, and a way round a problem with the stream).
NO_STREAM_ENV = "TORPOR_MIGRATE_NO_STREAM"


@dataclass(frozen=True)
class Summary:
    """A finished migration. ``downtime_ms``: from the freeze to the target's report that the
    process runs (what the app saw, at most); ``frozen_ms``: CRIU's own figure for the freeze
    (its ``stats-dump``, None if unknown); ``restore_ms``: the target's restore."""

    name: str
    mode: str
    source_pid: int
    target: str
    target_pid: int
    downtime_ms: float
    frozen_ms: float | None
    transfer_ms: float
    restore_ms: float
    bytes: int
    files: int
    total_ms: float
    # Filled in by copy mode (defaults for the other modes until they fill them).
    addresses: tuple[str, ...] = ()  # service addresses moved with it
    tcp_connections: int = 0  # established TCP connections it held (kept)
    fenced: bool = False  # the copy ran only once the source confirmed the original's kill
    # Of ``bytes``: what crossed as it is, and what the target copied from a base image it
    # held (the rest were zero pages); None where a mode does not count them.
    bytes_sent: int | None = None
    bytes_from_base: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The summary as ``--json`` prints it."""
        return asdict(self)


# -- the source ----------------------------------------------------------------------------------


def migrate_copy(
    name: str,
    host: str,
    port: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    tcp_established: bool = False,
    say: Callable[[str], None] | None = None,
    addresses: Sequence[str] = (),
) -> Summary:
    """Move the managed process ``name`` to the torpor at ``host:port`` in copy mode (see the
    module docstring), with its service addresses and ``addresses`` (``ADDR/PREFIX``); its
    :class:`Summary`. :class:`MigrationRefusedError` if pre-flight
    failed, :class:`MigrationError` (or the channel's errors, before anything was frozen) if
    anything else did: the process then runs here, unchanged."""
    started = time.monotonic()
    rec = _registry.load(name)
    _registry.check_live(rec)
    ref = rec.ref
    where = f"{host}:{port}"
    moving, conns = addresses_to_move(name, rec, addresses)
    tcp_established = tcp_established or bool(conns)
    offered = _candidates(rec)
    conn = connect(host, port)  # refused or unreachable: nothing touched
    with conn:
        conn.settimeout(timeout)
        reply = preflight(
            conn,
            {
                **_preflight.facts_for(name, ref.pid, mode="copy"),
                "addresses": [str(a) for a in moving],
                **({"bases": list(offered)} if offered else {}),
            },
            name=name,
            where=where,
            pid=ref.pid,
        )
        base = _base(conn, reply, offered, name=name, where=where, pid=ref.pid)
        # Without a base the pages go as CRIU dumps them (a target of this version takes a
        # stream whenever it agreed no base; one that does not fails it before the freeze).
        stream = base is None and not os.environ.get(NO_STREAM_ENV)
        if say is not None:
            kept = f", keeping {len(conns)} TCP connection(s)" if conns else ""
            say(f"pre-flight passed on {where}; dumping {name} (pid {ref.pid}){kept}")
        with contextlib.ExitStack() as stack, _locks.dumping(ref, unless_requested=True):
            if base is not None:
                stack.callback(base.close)
            _registry.update(name, ref, migrating=f"to {where}")
            try:
                move = _Move(conn, name, where, ref, tcp_established=tcp_established, say=say)
                move.addresses = moving
                move.base = base
                move.stream = stream
                summary = move.run(timeout)
            finally:
                with contextlib.suppress(OSError, TorporError):
                    _registry.update(name, ref, migrating=None)
    _record(name, ref, where)
    total = (time.monotonic() - started) * 1000
    return dataclasses.replace(summary, total_ms=round(total, 1), tcp_connections=len(conns))


def _candidates(rec: _registry.ManagedProcess) -> dict[str, _dedup_source.Offered]:
    """The images ``rec``'s process came from or went to, to offer as bases. The dedup
    modules (and the pools' they use, whose package loads every backend) are imported only
    for a process that has one: a fresh process does not pay for them before its freeze."""
    images = [rec.restored_from, rec.checkpointed_to]
    if not any(images):
        return {}
    from . import _dedup_source

    return _dedup_source.candidates(images)


def _base(
    conn: Conn,
    reply: dict[str, Any],
    offered: dict[str, _dedup_source.Offered],
    *,
    name: str,
    where: str,
    pid: int,
) -> _dedup_source.SourceBase | None:
    """The base the target holds (its chunk ids follow its ``ready``), None if none."""
    if not offered:
        return None
    from . import _dedup_source

    try:
        base = _dedup_source.read_lists(conn, reply, {k: v.files for k, v in offered.items()})
    except _dedup.DedupError as exc:
        raise MigrationError(
            f"migration of {name} to {where} failed: {exc.msg} (nothing was frozen; the "
            f"process runs here, pid {pid})"
        ) from exc
    if base is not None:
        base.open_local(offered[base.id].path)
    return base


def _record(name: str, ref: ProcRef, where: str) -> None:
    # The record stays, ended by CRIU's kill, saying where the process went; an event too.
    with contextlib.suppress(OSError, TorporError):
        _registry.update(name, ref, migrated_to=where)
    with contextlib.suppress(OSError, TorporError, ValueError):
        from .._supervise import _events

        _events.append(name, "checkpoint", migrated_to=where, mode="copy")


class _Move:
    """One dump whose post-dump notification carries the transfer and the target's restore."""

    def __init__(
        self,
        conn: Conn,
        name: str,
        where: str,
        ref: ProcRef,
        *,
        tcp_established: bool,
        say: Callable[[str], None] | None,
    ) -> None:
        self.conn, self.name, self.where, self.ref = conn, name, where, ref
        self.pid = ref.pid
        self.options = DumpOptions(tcp_established=tcp_established)
        self.say = say
        self.failure: BaseException | None = None
        self.frozen_at = self.sent_at = self.running_at = 0.0
        self.reply: dict[str, Any] = {}
        self.continued_at = 0.0  # when a fenced copy was continued there (its "continued")
        self.bytes = self.files = 0
        self.base: _dedup_source.SourceBase | None = None  # a base the target holds
        self.counts = _dedup.Counts()
        self.frozen_ms: float | None = None
        self.staging = Path()  # made by run(); the notifications do not carry it
        self.addresses: tuple[_address.IPAddr, ...] = ()
        self.warnings: list[str] = []
        self.before: set[tuple[str, str]] = set()  # nftables tables before the dump
        self.own_tables: tuple[tuple[str, str], ...] | None = None  # named at post-dump
        self.journal: Path | None = None  # what to undo after the commit (_leftovers)
        self.stream = False  # the pages go to the target's page server as CRIU dumps them
        self.handle: RelayHandle | None = None  # that stream's relay
        self.stream_end: _pagestream.StreamEnd | None = None  # how it ended, once known
        self.timeout = DEFAULT_TIMEOUT

    def run(self, timeout: float) -> Summary:
        out = _paths.private_dir(_paths.home() / "migrate", what="migration directory")
        locking = self.options.tcp_established
        self.before = _netlock.tables() if locking else set()
        staging = self.staging = Path(tempfile.mkdtemp(prefix=f"{self.name}.", dir=out))
        self.timeout = timeout
        try:
            try:
                if self.stream:
                    self._dump_streaming(staging)
                else:
                    CriuEngine().dump(self.pid, staging, self.options, notify=self._notify)
            except DumpError as exc:
                self._stream_failure()
                kept = self._copy_kept()
                error = self._failed(exc, kept=kept)  # the target's verdict first
                if kept:  # the copy there has the addresses: as after a commit
                    for addr in self.addresses:
                        self._take_down(addr)
                self._unlock()  # CRIU removed its lock on its failure; one named goes too
                for addr in () if kept else self.addresses:  # the peers' caches back here
                    with contextlib.suppress(OSError, TorporError):
                        _address.announce(addr)
                _leftovers.settle(self.journal)
                raise error from self.failure or exc
            with contextlib.suppress(TorporError):
                # First: the original is gone, the copy is the process (what the target
                # waits for, the window of two copies, is this long).
                self.conn.send({"type": "done"})
                if self.reply.get("stopped") is True:
                    # Fenced: the copy there waited stopped for this "done"; it runs now.
                    self.conn.settimeout(_CONTINUE_TIMEOUT)
                    if self.conn.recv().get("type") == "continued":
                        self.continued_at = time.monotonic()
            stats = read_dump_stats_at(staging)
            self.frozen_ms = stats.frozen_ms if stats is not None else None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # The copy runs there with the addresses (the target announced them): they leave
        # this host now. Until they have, CRIU's lock (kept after a dump that killed the
        # tree) drops what still comes here for the connections, so nothing answers an RST.
        for addr in self.addresses:
            self._take_down(addr)
        if locking:
            self._unlock()
        self.warnings += _leftovers.settle(self.journal)
        for line in self.warnings:
            if self.say is not None:
                self.say(line)
        return Summary(
            name=self.name,
            mode="copy",
            source_pid=self.pid,
            target=self.where,
            target_pid=int(self.reply.get("pid", 0)),
            downtime_ms=round(((self.continued_at or self.running_at) - self.frozen_at) * 1000, 1),
            frozen_ms=self.frozen_ms,
            transfer_ms=round((self.sent_at - self.frozen_at) * 1000, 1),
            restore_ms=reply_number(self.reply.get("restore_ms")),
            bytes=self.bytes,
            files=self.files,
            total_ms=0.0,
            addresses=tuple(str(a) for a in self.addresses),
            fenced=bool(self.continued_at),
            bytes_sent=self.counts.sent,
            bytes_from_base=self.counts.from_base,
        )

    def _dump_streaming(self, staging: Path) -> None:
        try:
            self.handle = _pagestream.open_stream(self.conn, timeout=self.timeout)
        except ChannelError as exc:
            raise MigrationError(
                f"migration of {self.name} to {self.where} failed: {exc.msg} (nothing was "
                f"frozen; the process runs here, pid {self.pid})"
            ) from exc
        _pagestream.dump(
            self.pid, staging, self.handle.criu_sock, self.options, notify=self._notify
        )

    def _stream_end(self) -> _pagestream.StreamEnd:
        """How the page stream ended (waited for once the dump let go of it)."""
        assert self.handle is not None
        if self.stream_end is None:
            self.stream_end = _pagestream.stream_result(
                self.conn, self.handle, timeout=self.timeout
            )
        return self.stream_end

    def _stream_failure(self) -> None:
        """After a failed streaming dump: why, as the stream's end says, if nothing else
        did (the target's full disk, a broken channel)."""
        if self.handle is None or self.stream_end is not None:
            return
        try:
            end = self._stream_end()
        except ChannelError as exc:
            if self.failure is None:
                self.failure = exc
            return
        if end.disk and self.failure is None:
            self.failure = MigrationError(f"{self.where} could not take it: {end.error}")

    def _criu_tables(self) -> tuple[tuple[str, str], ...]:
        """This dump's lock table (:func:`._netlock.own_tables`, named once, at ``post-dump``
        when the journal and the target need it). Empty without ``tcp_established``: CRIU
        then locks nothing."""
        if self.own_tables is None:
            self.own_tables = ()
            if self.options.tcp_established:
                self.own_tables, warning = _netlock.own_tables(self.staging, self.before)
                if warning is not None:
                    self.warnings.append(warning)
        return self.own_tables

    def _unlock(self) -> None:
        """Drop this dump's own lock table, never another dump's (a CRIU dump made meanwhile
        on this host has a ``CRIU-*`` table of its own). None named (the dump failed before
        ``post-dump``): CRIU removed its lock itself."""
        try:
            for table in self.own_tables or ():
                _netlock.drop(table)
        except TorporError as exc:
            self.warnings.append(f"warning: CRIU's network lock is left here: {exc.msg}")

    def _take_down(self, addr: _address.IPAddr) -> None:
        try:
            _address.take_down(addr)
        except TorporError as exc:
            self.warnings.append(f"warning: {addr} could not be removed here: {exc.msg}")

    def _copy_kept(self) -> bool:
        """After a failed dump: whether the target's copy is all there is of the process (it
        reported ``running`` and the original is gone: CRIU killed it, then failed before
        its dump returned)."""
        return bool(self.running_at) and not self.ref.alive()

    def _failed(self, exc: DumpError, *, kept: bool) -> MigrationError:
        # The target's verdict. A copy it restored must not run on beside the original:
        # "abort" kills it. Once the original is gone (kept) the copy is the process:
        # "abort" would kill the last one, and silence would leave it stopped, in doubt
        # (none running); "done" lets the target continue it: exactly one runs.
        with contextlib.suppress(TorporError):
            self.conn.send({"type": "done" if kept else "abort"})
        if kept:
            with contextlib.suppress(OSError, TorporError):
                _registry.update(self.name, self.ref, migrated_to=self.where)
            fate = (
                f"the original is gone here; its copy was told to run on {self.where} "
                f"(pid {self.reply.get('pid')})"
            )
        elif self.ref.alive():
            fate = f"the process runs here, unchanged (pid {self.pid})"
        else:
            fate = "the process is gone here"
        why = self.failure
        reason = why.msg if isinstance(why, TorporError) else repr(why) if why else exc.msg
        return MigrationError(
            f"migration of {self.name} to {self.where} failed: {reason} ({fate})",
            hint=None if why is None else getattr(why, "hint", None),
        )

    def _notify(self, event: NotifyEvent) -> bool:
        if event.name == "pre-dump":
            self.frozen_at = time.monotonic()  # CRIU freezes the tree right after this answer
            return True
        if event.name != "post-dump":
            return True
        try:
            self._transfer()
            # Before the commit: what this command must undo after it, should it be killed
            # there (a later sweep finishes it). Not written: no commit.
            locked = self.options.tcp_established
            self.journal = _leftovers.record(
                self.name,
                self.ref,
                target=self.where,
                addresses=self.addresses,
                tables=self._criu_tables() if locked else (),
            )
        except BaseException as exc:  # answered false: CRIU thaws the original
            self.failure = exc
            return False
        return True

    def _transfer(self) -> None:
        conn = self.conn
        staging = self.staging
        cmdline, rss = facts(self.pid)
        # The lock CRIU made for this dump: the target names its own lock so, for its
        # restore to lift it at the right moment (see _netlock.block).
        locks = sorted(self._criu_tables()) if self.addresses else []
        image_facts = {
            "pid": self.pid,
            "cmdline": list(cmdline),
            "rss_bytes": rss,
            "criu_version": criu_version(),
            "tcp_established": self.options.tcp_established,
            "shell_job": self.options.shell_job,
            "criu_lock": locks[0][1] if len(locks) == 1 else None,
        }
        streamed: dict[str, int] = {}
        if self.handle is not None:
            end = self._stream_end()
            if end.error is not None:
                raise MigrationError(f"{self.where} could not take it: {end.error}")
            streamed = dict(end.files)
        sent = transfer_image(
            conn, staging, image_facts, say=self.say, where=self.where, base=self.base,
            consume=True, streamed=streamed,
        )  # fmt: skip
        self.bytes, self.files, self.counts = sent.bytes, sent.files, sent.counts
        self.sent_at = time.monotonic()
        if self.say is not None:
            c = sent.counts
            based = (
                f" ({c.sent} sent, {c.from_base} from the base image there, {c.zero} zero)"
                if self.base is not None
                else ""
            )
            self.say(f"sent {self.bytes} bytes in {self.files} files{based}; {self.where} restores")
        reply = conn.recv()
        if reply.get("type") == "failed":
            raise MigrationError(f"{self.where} could not take it: {reply.get('error')}")
        if reply.get("type") != "running" or not isinstance(reply.get("pid"), int):
            raise MigrationError(f"{self.where} answered {reply.get('type')!r}, not running")
        self.running_at = time.monotonic()
        self.reply = reply
        hold = os.environ.get(_SOURCE_HOLD_ENV)
        if hold:  # tests only: the two-copy window, held open
            with open(hold, "x"):
                pass
            time.sleep(3600)
