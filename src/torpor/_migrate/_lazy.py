"""``torpor migrate NAME --to HOST:PORT --mode lazy``: post-copy migration (issue 9).

The order, on both hosts (see docs/migration-lazy.md):

1. **Pre-flight**, as in copy mode: nothing is frozen before the target said ``ready``.
2. **Lazy dump** on the source (:mod:`._lazy_dump`): CRIU writes everything but the private
   anonymous pages and stops at ``post-dump`` with the tree frozen. Its page server will
   speak over one end of a local socketpair, never a port: nobody can connect to it.
3. The **non-memory files** go over the channel exactly as in copy mode (``image``, ``D``
   frames, ``hashes``: :func:`._wire.send_file`), the target seals them
   (``_serve._Incoming._receive``) and restores the copy lazily in a keeper of its own
   (:mod:`._lazy_target`): ``criu lazy-pages`` waits for its pages, the copy runs at once.
   The target answers ``running``.
4. Only then is ``post-dump`` answered true. Both sides turn the channel into a **relay**
   (:func:`._relay.relay`, on CRIU's sockets at both ends): the target's daemon asks for
   the pages it faults on and pushes for the rest; the source's CRIU answers. The source's
   record says ``migrating to ..., pages in flight``, the target's ``migrating from ...,
   pages in flight``.
5. When the last page has moved, the daemon closes, the source's CRIU kills the original and
   its dump returns; the target's copy is resident. ``done`` and ``settled`` end the channel.

Failures:

- *Before the target runs the copy* (a refusal, a failed restore, the link cut, no answer in
  time): ``post-dump`` is answered false and CRIU's page server is sent a command it does not
  know (:data:`._lazy_dump.FAIL_COMMAND`): CRIU thaws the original, unchanged. The target is
  told ``abort``.
- *After* (the relay breaks: the link cut, the target's server killed): the target kills its
  half-moved copy (its pages cannot arrive: never run on missing memory) and records why;
  the source waits :data:`FENCE` seconds, longer than the target takes to notice a silent
  link (:data:`IDLE`), so that the copy is dead, then makes CRIU thaw the original. It
  resumes from its state at the freeze: what the copy did meanwhile is lost, said so.
- *The source killed* (the ``torpor migrate`` command): CRIU's page server sees its socket
  close, takes it for the end of the transfer and kills the original; the target's relay
  breaks and it kills its copy. The process is lost: the source must stay up until the last
  page has moved, which the command says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _paths
from .._engine import criu_version
from .._errors import DumpError, TorporError
from .._process import _locks, _registry
from .._process._proc import ProcRef, facts
from . import _address, _leftovers, _netlock, _preflight
from ._channel import ChannelError, Conn, connect
from ._copy import Summary
from ._lazy_dump import Guard, lazy_dump, repair_off
from ._relay import relay, start_relay
from ._send import MigrationError, addresses_to_move, preflight, reply_number, transfer_image

if TYPE_CHECKING:
    from ._lazy_target import Prepared
    from ._serve import _Incoming

DEFAULT_TIMEOUT = 120.0
IDLE = 8.0  # seconds without a byte on the relay after which the target gives up the copy
# Seconds the source waits after a break before the original resumes: longer, with a margin,
# than any wait of the target's copy without word from the source (IDLE, and
# _closehold.HOLD_LIMIT for the daemon's held close): tests/unit/test_migrate_fence.py.
FENCE = IDLE + 2.0
SETTLE = 15.0  # seconds the target waits for the keeper to record how the copy's filling ended
_STALL_ENV = "TORPOR_TEST_LAZY_STALL"  # tests: a path made once pages flow, then they stop


# -- the source ----------------------------------------------------------------------------------


def migrate_lazy(
    name: str,
    host: str,
    port: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    tcp_established: bool = False,
    say: Callable[[str], None] | None = None,
    addresses: Sequence[str] = (),
) -> Summary:
    """Move the managed process ``name`` to the torpor at ``host:port`` post-copy (see the
    module docstring), with its service addresses and ``addresses`` (``--address``); its
    :class:`Summary` once the last page has moved.
    :class:`MigrationRefusedError` if pre-flight failed, :class:`MigrationError` if anything
    else did (the message says where the process runs)."""
    started = time.monotonic()
    rec = _registry.load(name)
    _registry.check_live(rec)
    ref = rec.ref
    where = f"{host}:{port}"
    moving, conns = addresses_to_move(name, rec, addresses)
    tcp = tcp_established or bool(conns)
    first = {
        **_preflight.facts_for(name, ref.pid, mode="lazy"),
        "addresses": [str(a) for a in moving],
    }
    conn = connect(host, port)  # refused or unreachable: nothing touched
    with conn:
        conn.settimeout(timeout)
        preflight(conn, first, name=name, where=where, pid=ref.pid)
        if say is not None:
            say(f"pre-flight passed on {where}; dumping {name} (pid {ref.pid}) lazily")
        with _locks.dumping(ref, unless_requested=True):
            _registry.update(name, ref, migrating=f"to {where}")
            try:
                move = _LazyMove(conn, name, where, ref, say=say, timeout=timeout)
                move.addresses, move.tcp = moving, tcp
                summary = move.run()
            finally:
                with contextlib.suppress(OSError, TorporError):
                    _registry.update(name, ref, migrating=None)
    with contextlib.suppress(OSError, TorporError):
        _registry.update(name, ref, migrated_to=where)
    with contextlib.suppress(OSError, TorporError, ValueError):
        from .._supervise import _events

        _events.append(name, "checkpoint", migrated_to=where, mode="lazy")
    total = (time.monotonic() - started) * 1000
    return dataclasses.replace(summary, total_ms=round(total, 1), tcp_connections=len(conns))


class _LazyMove:
    """One lazy dump: its ``post-dump`` carries the files; then its page server's socket is
    relayed over the channel, the relay watched by a :class:`._lazy_dump.Guard`, until the
    last page has moved."""

    def __init__(
        self,
        conn: Conn,
        name: str,
        where: str,
        ref: ProcRef,
        *,
        say: Callable[[str], None] | None,
        timeout: float,
    ) -> None:
        self.conn, self.name, self.where, self.ref = conn, name, where, ref
        self.pid = ref.pid
        self.say = say
        self.timeout = timeout
        self.staging = Path()
        self.failure: BaseException | None = None
        self.frozen_at = self.sent_at = self.relaying_at = 0.0
        self.settled: dict[str, Any] = {}
        self.bytes = self.files = 0
        self.rss = 0
        # CRIU's page server speaks on ``criu_sock``; the relay, through the guard, on the
        # other end.
        self.criu_sock, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.guard = Guard(ours, stall=os.environ.get(_STALL_ENV))
        self.relay_thread: threading.Thread | None = None
        self.addresses: tuple[_address.IPAddr, ...] = ()
        self.tcp = False
        self.before: set[tuple[str, str]] = set()  # nftables tables before CRIU's lock
        # This dump's own lock table, named at ``post-dump`` (:meth:`_name_lock`): the only
        # one this move unlocks, journals or names to the target.
        self.own_tables: tuple[tuple[str, str], ...] = ()
        self.let_go = False  # the addresses were taken down here for the target
        self.taken_back = False
        self.journal: Path | None = None  # what to undo after the commit (_leftovers)

    def run(self) -> Summary:
        out = _paths.private_dir(_paths.home() / "migrate", what="migration directory")
        self.staging = Path(tempfile.mkdtemp(prefix=f"{self.name}.", dir=out))
        self.before = _netlock.tables() if self.tcp else set()
        try:
            try:
                lazy_dump(
                    self.pid, self.staging, self.criu_sock.fileno(), notify=self._notify,
                    tcp_established=self.tcp,
                )  # fmt: skip
            except DumpError as exc:
                self._take_back()
                _leftovers.settle(self.journal)
                raise self._failed(exc) from self.failure or exc
            finally:
                self.criu_sock.close()
                if self.relay_thread is not None:
                    self.relay_thread.join()
                self.guard.close()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        with contextlib.suppress(TorporError):
            self.conn.send({"type": "done"})  # the original is gone: the copy is the process
        if self.tcp:
            self._unlock()  # CRIU leaves its lock after a dump that killed the tree
        for line in _leftovers.settle(self.journal):
            if self.say is not None:
                self.say(line)
        got = self.settled
        if got.get("state") != "resident" and self.say is not None:
            self.say(f"warning: {self.where} did not report the copy resident ({got})")
        resume_ms = reply_number(got.get("resume_ms"))
        return Summary(
            name=self.name,
            mode="lazy",
            source_pid=self.pid,
            target=self.where,
            target_pid=int(got["pid"]) if isinstance(got.get("pid"), int) else 0,
            # Frozen here until the files were sent and checked, then until the copy ran there.
            downtime_ms=round((self.relaying_at - self.frozen_at) * 1000 + resume_ms, 1),
            frozen_ms=None,
            transfer_ms=round((self.sent_at - self.frozen_at) * 1000, 1),
            restore_ms=reply_number(got.get("restore_ms")),
            bytes=self.bytes + self.guard.pages,
            files=self.files,
            total_ms=0.0,
            addresses=tuple(str(a) for a in self.addresses),
        )

    def _unlock(self) -> None:
        """Drop this dump's own lock table (named at ``post-dump``), never another's: a
        CRIU dump made meanwhile on this host (another migration, a ``torpor checkpoint
        --tcp-established``) has a ``CRIU-*`` table of its own. Nothing named (the dump
        failed before ``post-dump``, or ``post-dump`` was answered false): CRIU removed its
        lock itself."""
        try:
            for table in self.own_tables:
                _netlock.drop(table)
        except TorporError as exc:
            if self.say is not None:
                self.say(f"warning: CRIU's network lock is left here: {exc.msg}")

    def _take_back(self) -> None:
        """The original resumes here: its addresses come back (if they were let go) and
        CRIU's lock goes (CRIU lifts it on a failed dump, but not after a failed transfer),
        before CRIU is told to thaw it, as CRIU itself unlocks before it thaws."""
        if self.taken_back:
            return
        self.taken_back = True
        if self.let_go:
            for addr in self.addresses:
                with contextlib.suppress(OSError, TorporError):
                    _address.bring_up(addr)
                    _address.announce(addr)
        if self.tcp:
            from .._process._proc import descendants

            repair_off([self.pid, *descendants(self.pid)])
            self._unlock()

    # -- CRIU's notifications ------------------------------------------------------------------

    def _notify(self, event: Any) -> bool:
        if event.name == "pre-dump":
            self.frozen_at = time.monotonic()
            return True
        if event.name != "post-dump":
            return True
        try:
            self.own_tables = self._name_lock()
            self._transfer()
            # Before the copy runs: what this command must undo should it be killed after
            # CRIU's kill (a later sweep finishes it). Not written: no commit.
            self.journal = _leftovers.record(
                self.name,
                self.ref,
                target=self.where,
                addresses=self.addresses,
                tables=self.own_tables,
            )
        except BaseException as exc:  # answered false: CRIU thaws the original
            self.failure = exc
            self.guard.fail_criu()
            return False
        # The target brings the addresses up as it restores: they leave this host now (and
        # come back if the original resumes).
        self.let_go = bool(self.addresses)
        for addr in self.addresses:
            with contextlib.suppress(TorporError):
                _address.take_down(addr)
        self._start_relay()
        return True

    def _start_relay(self) -> None:
        self.relaying_at = time.monotonic()
        with contextlib.suppress(OSError, TorporError):
            _registry.update(self.name, self.ref, migrating=f"to {self.where}, pages in flight")
        if self.say is not None:
            self.say(
                f"{self.name} resumes on {self.where}; its memory follows: this host must stay "
                f"up until about {self.rss / (1 << 20):.0f} MiB have moved"
            )
        self.relay_thread = threading.Thread(
            target=self._relay, name="torpor-lazy-relay", daemon=True
        )
        self.relay_thread.start()

    def _relay(self) -> None:
        """Relay until both ends ended, then learn how the copy fared; make CRIU thaw the
        original unless the target's daemon closed the transfer with every page in."""
        try:
            relay(self.conn, self.guard.criu, idle_timeout=IDLE, gate=self.guard)
            self.conn.settimeout(SETTLE + 5)
            self.settled = self.conn.recv()
        except TorporError as exc:
            if self.guard.closed_by_target:
                return  # every page is there: CRIU ends the transfer well
            # The link broke: the copy there is killed once it notices (at once, or after IDLE
            # seconds of silence); only then may the original run on, here.
            self.failure = exc
            time.sleep(FENCE)
            self._take_back()
            self.guard.fail_criu()
            return
        if not self.guard.closed_by_target:
            why = self.settled.get("error") if self.settled.get("type") == "settled" else None
            self.failure = MigrationError(
                f"{self.where} ended the transfer: {why or 'no reason given'}"
            )
            self._take_back()
            self.guard.fail_criu()

    def _name_lock(self) -> tuple[tuple[str, str], ...]:
        """This dump's lock table (:func:`._netlock.own_tables`, at ``post-dump``). Empty
        without ``tcp_established``: CRIU then locks nothing."""
        if not self.tcp:
            return ()
        tables, warning = _netlock.own_tables(self.staging, self.before)
        if warning is not None and self.say is not None:
            self.say(warning)
        return tables

    def _transfer(self) -> None:
        conn = self.conn
        staging = self.staging
        cmdline, rss = facts(self.pid)
        self.rss = rss
        # The lock CRIU made for this dump: the target names its own lock so, for its
        # restore to lift it at the right moment (see _netlock.block).
        locks = self.own_tables if self.addresses else ()
        image_facts = {
            "pid": self.pid,
            "cmdline": list(cmdline),
            "rss_bytes": rss,
            "criu_version": criu_version(),
            "tcp_established": self.tcp,
            "shell_job": False,
            "criu_lock": locks[0][1] if len(locks) == 1 else None,
            "lazy": True,
        }
        sent = transfer_image(conn, staging, image_facts, say=self.say, where=self.where)
        self.bytes, self.files = sent.bytes, sent.files
        self.sent_at = time.monotonic()
        reply = conn.recv()
        if reply.get("type") == "failed":
            raise MigrationError(f"{self.where} could not take it: {reply.get('error')}")
        if reply.get("type") != "verified":
            raise MigrationError(f"{self.where} answered {reply.get('type')!r}, not verified")

    def _failed(self, exc: DumpError) -> MigrationError:
        ran = self.settled.get("resumed") is not False and self.relaying_at > 0
        if self.relaying_at == 0:
            with contextlib.suppress(TorporError):
                self.conn.send({"type": "abort"})  # nothing runs there: say so anyway
        alive = self.ref.alive()
        if not alive:
            fate = "the process is gone here"
        elif ran:
            fate = (
                f"the copy there is killed; the original resumed here from its state at the "
                f"freeze, pid {self.pid}: what the copy did meanwhile is lost"
            )
        else:
            fate = f"the process runs here, unchanged (pid {self.pid})"
        why = self.failure
        reason = why.msg if isinstance(why, TorporError) else repr(why) if why else exc.msg
        if ran:
            reason = f"the transfer of its memory broke: {reason}"
        with contextlib.suppress(OSError, TorporError, ValueError):
            from .._supervise import _events

            _events.append(
                self.name, "checkpoint-failed", error=reason, migrated_to=self.where,
                mode="lazy", resumed_here=alive,
            )  # fmt: skip
        return MigrationError(
            f"migration of {self.name} to {self.where} failed: {reason} ({fate})",
            hint=None if why is None else getattr(why, "hint", None),
        )


# -- the target ----------------------------------------------------------------------------------


def serve_lazy(incoming: _Incoming, name: str, first: Mapping[str, Any]) -> None:
    """The target's side, after pre-flight passed and ``ready`` was sent: receive and seal
    the files, relay the pages while the copy is restored and runs, report how it settled.
    The copy's keeper is forked first, while the source dumps (:class:`._lazy_target.Prepared`),
    and ended if no image comes."""
    from ._lazy_target import Prepared

    keeper = Prepared(name, source=incoming.peer)
    try:
        with incoming.receiving(name) as image:
            _Filling(incoming, name, image, keeper).run()
    finally:
        keeper.cancel()  # no-op once it was handed the image


class _Filling:
    """The copy is restored and runs while its pages come through the relay."""

    def __init__(self, incoming: _Incoming, name: str, image: Any, keeper: Prepared) -> None:
        self.incoming, self.name, self.image = incoming, name, image
        self.keeper = keeper
        self.peer = incoming.peer
        self.rec: _registry.ManagedProcess | None = None

    def _recorded(self, rec: _registry.ManagedProcess) -> None:
        """The copy's record holds its service addresses before the server's journal of them
        goes (:meth:`._serve._Incoming.with_addresses`): a sweep in between finds one."""
        with contextlib.suppress(OSError, TorporError):
            _registry.update(
                rec.name, rec.ref, service_addresses=tuple(str(a) for a in self.incoming.addresses)
            )

    def run(self) -> None:
        conn = self.incoming.conn
        conn.send({"type": "verified"})
        # The source's CRIU serves from now on; the keeper hands the relay the daemon's socket.
        handle = start_relay(conn, idle_timeout=IDLE, daemon_socket=True)
        started = time.monotonic()
        report: dict[str, Any] = {"type": "settled", "resumed": False}
        try:
            try:
                self.rec = self.incoming.with_addresses(
                    lambda: self.keeper.restore(self.image, handle.criu_sock.fileno()),
                    recorded=self._recorded,
                )
            finally:
                handle.criu_sock.close()  # the keeper holds it now (or the restore failed)
        except TorporError as exc:
            self._end_relay(handle)
            report["error"] = f"the restore failed: {exc.msg}"
            with contextlib.suppress(TorporError):
                conn.send({**report, "state": "failed"})
            raise
        took = round((time.monotonic() - started) * 1000, 1)
        report.update(resumed=True, pid=self.rec.pid, restore_ms=took, resume_ms=took)
        self.incoming.log(
            f"{self.name!r} from {self.peer} runs (pid {self.rec.pid}) after {took} ms; "
            "pages in flight"
        )
        try:
            stats = handle.wait()
        except ChannelError as exc:
            self._lost(f"the transfer from {self.peer} broke: {exc.msg}")
            return
        state = self._settled()
        report.update(state=state.state if state else None, error=state.error if state else None)
        with contextlib.suppress(TorporError):
            conn.send(report)
        if state is None or state.state != "resident":
            self._lost(f"its filling ended {state.state if state else 'unrecorded'}")
            return
        with contextlib.suppress(TorporError):
            conn.settimeout(SETTLE)
            done = conn.recv()
            if done.get("type") != "done":
                self.incoming.log(f"{self.peer} ended with {done.get('type')!r}, not done")
        with contextlib.suppress(OSError, TorporError):
            _registry.update(
                self.name, self.rec.ref, migrating=None, migrated_from=self.peer,
                service_addresses=tuple(str(a) for a in self.incoming.addresses),
            )  # fmt: skip
        for addr in self.incoming.addresses:  # again: the source has let them go long since
            with contextlib.suppress(OSError, TorporError):
                _address.announce(addr)
        with contextlib.suppress(OSError, TorporError, ValueError):
            from .._supervise import _events

            _events.append(self.name, "restore", migrated_from=self.peer, mode="lazy")
        self.incoming.log(
            f"{self.name!r} migrated from {self.peer}: pid {self.rec.pid}, running after "
            f"{took} ms, {stats.received} bytes of pages moved"
        )

    @staticmethod
    def _end_relay(handle: Any) -> None:
        with contextlib.suppress(TorporError):
            handle.wait(IDLE + 5)

    def _settled(self) -> Any:
        from .._lazy._restore import wait_states

        return wait_states([self.name], timeout=SETTLE).get(self.name)

    def _lost(self, why: str) -> None:
        """The copy is (being) killed by its keeper's watch; make sure, and record it."""
        rec = self.rec
        assert rec is not None
        state = self._settled()
        # Killed (if the watch did not, yet: never run on missing memory), the addresses down.
        self.incoming.abandon(rec)
        error = state.error if state is not None and state.error else why
        with contextlib.suppress(OSError, TorporError):
            _registry.update(
                self.name, rec.ref, migrating=None,
                restored_from=f"aborted lazy migration from {self.peer}: {why}",
            )  # fmt: skip
        self.incoming.log(f"{self.name!r} from {self.peer}: copy killed: {why} ({error})")
