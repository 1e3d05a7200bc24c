"""The networked side of migration: ``torpor agent run|start --listen ADDR:PORT``.

It accepts trusted peers only (:mod:`._channel`: an untrusted one fails in the TLS handshake
and gets nothing), one migration at a time, and for each:

1. ``preflight``: the checks of :mod:`._preflight`, answered ``ready`` or ``refused`` with
   the problems.
   A copy-mode source may name *bases* (images it came from): one this host holds is
   answered with its chunk ids (:mod:`._dedup_target`), so that only what is not in it
   crosses.
2. ``image``: the files announced (plain names, sizes), each received into a new staging
   directory of this home's images directory (created ``O_EXCL``, 0600) and hashed as it
   arrives (whole, or as plans against the base: :mod:`._dedup`); ``hashes``: every file's
   SHA-256 must match the source's, else ``failed``.
3. The image is sealed here (manifest built from the source's facts and the files verified,
   signed with this host's key) and restored under the same name, by a keeper of this host
   (:func:`torpor._process._manage.restore`), the service addresses (checked in pre-flight)
   brought up first behind a network lock lifted once the restore is done; ``running`` with
   the new pid, or ``failed``.
4. The source then says ``done`` (it let CRIU kill the original) or ``abort`` (it resumed the
   original; the copy here is killed, its addresses taken down). Silence there leaves the copy
   running, recorded as in doubt. The image directory is removed either way: it was only in
   transit.

``TORPOR_TEST_MIGRATE_HOLD`` (tests only): a path created once the image has arrived, after
which the server waits, so a test can kill it mid-migration.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .. import _paths
from .._errors import ProcessNotFoundError, TorporError
from .._images import _manifest
from .._images._image import Image, Staging
from .._images._manifest import FileEntry
from .._process import _manage, _registry
from .._process._proc import start_time
from .._safe import create_file, is_plain_name, open_dir
from . import _address, _dedup, _netlock, _preflight
from ._apart import run_apart
from ._channel import _DATA, _MSG, ChannelError, Conn, PeerRefusedError
from ._dedup_target import BaseCache, Held, agreed
from ._dedup_target import receive_file as receive_planned
from ._pagestream import PagesFailed
from ._pagestream import receive as receive_pages
from ._send import MAX_FILES
from ._serve_start import holding_home, listening
from ._serve_sweep import (
    _JOURNAL,
    _clear_journal,
    _sweep,
    forget_transit,
    in_transit,
    record_transit,
)
from ._wire import receive_file

_MAX_PID = (1 << 31) - 1  # as the manifest's bound
_MAX_FACT = 1 << 62  # bytes of resident memory a peer may claim
ANSWER_TIMEOUT = 120.0  # seconds a source may take between its messages
_HOLD_ENV = "TORPOR_TEST_MIGRATE_HOLD"


def serve(
    addr: str, port: int, *, ready: Callable[[str], None], log: Callable[[str], None]
) -> None:
    """Serve migrations on ``addr:port`` until killed; ``ready(address)`` once listening.
    The home's lock first, then the bind, then the sweep (:mod:`._serve_start`)."""
    bases = BaseCache()  # the chunk ids of the bases used, for as long as this server runs
    verdicts: dict[bytes, list[str]] = {}  # CRIU's cpuinfo verdicts, likewise
    with holding_home(), listening(addr, port) as lst:  # held for the server's life
        _sweep(log)
        host, bound = lst.address
        where = f"{host}:{bound}"
        ready(where)
        while True:
            try:
                conn = lst.accept()
            except PeerRefusedError as exc:
                log(f"refused: {exc}")
                continue
            except (OSError, ChannelError) as exc:
                log(f"accept failed: {exc}")
                continue
            with conn:
                conn.settimeout(ANSWER_TIMEOUT)
                try:
                    _Incoming(conn, where, log, bases=bases, verdicts=verdicts).handle()
                except TorporError as exc:
                    log(f"migration from {conn.peer.name} failed: {exc}")
                except Exception as exc:  # e.g. a full disk: one migration fails, not the server
                    log(f"migration from {conn.peer.name} failed: {exc!r}")


class _Incoming:
    """One migration offered by a trusted peer."""

    def __init__(
        self,
        conn: Conn,
        where: str,
        log: Callable[[str], None],
        *,
        bases: BaseCache | None = None,
        verdicts: dict[bytes, list[str]] | None = None,
    ) -> None:
        self.conn, self.where, self.log = conn, where, log
        self.verdicts = verdicts  # CRIU's cpuinfo verdicts, by cpuinfo (_preflight.problems)
        self.bases = bases if bases is not None else BaseCache()
        self.base: Held | None = None  # the base the source was offered (copy mode)
        self.counts = _dedup.Counts()  # of the image received
        self.peer = conn.peer.name
        self.outcome: str | None = None
        self.addresses: tuple[_address.IPAddr, ...] = ()  # checked in pre-flight
        self.address_ms = 0.0  # spent on them (and the lock) in the restore
        self.links: list[_address.Link] = []
        self.criu_lock: str | None = None  # the name of the dump's CRIU lock table
        self.stream_offered = False  # whether the source may stream its pages (_pagestream)

    def handle(self) -> None:
        conn = self.conn
        first = conn.recv()
        if first.get("type") != "preflight":
            raise ChannelError(f"{self.peer} began with {first.get('type')!r}, not preflight")
        # A server's CPU verdicts, kept for its life (none for an _Incoming made without).
        kept = {"verdicts": self.verdicts} if self.verdicts is not None else {}
        found = _preflight.problems(first, where=self.where, **kept)
        if found:
            conn.send({"type": "refused", "problems": found})
            self.log(f"refused {first.get('name')!r} from {self.peer}: {'; '.join(found)}")
            return
        asked = first.get("addresses", [])
        found = _address.problems(asked if isinstance(asked, list) else [None], where=self.where)
        if found:
            conn.send({"type": "refused", "problems": found})
            self.log(f"refused {first.get('name')!r} from {self.peer}: {'; '.join(found)}")
            return
        mode = first["mode"]
        try:
            ids = _dedup.parse_ids(first.get("bases")) if mode == "copy" else []
        except _dedup.DedupError as exc:
            conn.send({"type": "refused", "problems": [exc.msg]})
            self.log(f"refused {first.get('name')!r} from {self.peer}: {exc.msg}")
            return
        self.addresses = _address.parse_all(asked)
        # Read now, not in the downtime: the interfaces the addresses will go on.
        self.links = _address.links() if self.addresses else []
        name = str(first["name"])
        # Also before the freeze: the base's chunk ids (computed once, then cached).
        self.base = self.bases.hold(ids, self.log)
        try:
            self._serve(first, name, mode)
        finally:
            if self.base is not None:
                self.base.close()

    def _serve(self, first: dict[str, Any], name: str, mode: str) -> None:
        conn = self.conn
        if self.base is not None:
            self.base.offer(conn, {"type": "ready"})
        else:
            # Without a base, copy mode's pages may come as CRIU dumps them (_pagestream).
            self.stream_offered = mode == "copy"
            conn.send({"type": "ready"})
        if mode == "lazy":
            from ._lazy import serve_lazy

            serve_lazy(self, name, first)
            return
        if mode == "pool":
            from ._viapool import serve_pool

            serve_pool(self, name, first)
            return
        with self.receiving(name) as image:
            hold = os.environ.get(_HOLD_ENV)
            if hold:
                with open(hold, "x"):
                    pass
                time.sleep(3600)
            self._restore(image, name)
        if self.outcome is not None:
            self.log(self.outcome)  # last: everything it says is done, the image removed

    @contextlib.contextmanager
    def receiving(self, name: str) -> Iterator[Image]:
        """The image the source sends next (its ``image`` message, the files, ``hashes``),
        received into a new staging directory, verified and sealed here (a refusal answered
        ``failed``); removed on leaving, whatever happened: it is only in transit."""
        msg = self.conn.recv()
        streaming = msg.get("type") == "pages-stream" and self.stream_offered
        if msg.get("type") != "image" and not streaming:
            raise ChannelError(f"{self.peer} sent {msg.get('type')!r}, not the image")
        staging = Staging(in_transit(name))
        record_transit(staging)  # before it is made: only what is recorded is swept
        image: Image | None = None
        try:
            try:
                streamed: dict[str, FileEntry] | None = None
                if streaming:
                    # The pages first, as CRIU dumps them; then the rest of the image.
                    staging.create()
                    streamed = receive_pages(
                        self.conn, staging.path, where=self.where, timeout=ANSWER_TIMEOUT,
                        log=self.log,
                    )  # fmt: skip
                    msg = self.conn.recv()
                    if msg.get("type") != "image":
                        raise ChannelError(f"{self.peer} sent {msg.get('type')!r}, not the image")
                image = self._receive(staging, name, msg, streamed)
            except PagesFailed:
                raise  # the source was told why
            except TorporError as exc:
                with contextlib.suppress(TorporError):
                    self.conn.send({"type": "failed", "error": exc.msg})
                raise
            yield image
        finally:
            staging.discard()
            if image is not None:
                shutil.rmtree(image.path, ignore_errors=True)
            forget_transit()

    def _receive(
        self,
        staging: Staging,
        name: str,
        msg: Mapping[str, Any],
        streamed: Mapping[str, FileEntry] | None = None,
    ) -> Image:
        """The image ``msg`` announces, received, checked and sealed, with ``streamed``: files
        already written into ``staging`` (and hashed) by this host's page server."""
        streamed = streamed or {}
        files = msg.get("files")
        facts = msg.get("facts")
        if not isinstance(files, list) or not isinstance(facts, dict) or len(files) > MAX_FILES:
            raise ChannelError(f"{self.peer} sent a malformed image message")
        sizes: dict[str, int] = {}
        for f in files:
            n, size = (f.get("name"), f.get("size")) if isinstance(f, dict) else (None, None)
            if not is_plain_name(n) or not isinstance(size, int) or isinstance(size, bool):
                raise ChannelError(f"{self.peer} announced a bad image file {f!r}")
            if size < 0 or n in sizes or n in streamed:
                raise ChannelError(f"{self.peer} announced a bad image file {f!r}")
            sizes[str(n)] = size
        cmdline, rss, pid = facts.get("cmdline"), facts.get("rss_bytes"), facts.get("pid")
        if not (
            isinstance(cmdline, list)
            and all(isinstance(a, str) for a in cmdline)
            and isinstance(rss, int)
            and not isinstance(rss, bool)
            and 0 <= rss <= _MAX_FACT
            and isinstance(pid, int)
            and not isinstance(pid, bool)
            and 0 < pid <= _MAX_PID  # as a manifest's, which this one becomes
        ):
            raise ChannelError(f"{self.peer} sent malformed process facts")
        total = sum(sizes.values())
        st = os.statvfs(staging.path.parent)
        if total > st.f_bavail * st.f_frsize:
            raise TorporError(
                f"the image from {self.peer} is {total >> 20} MiB, more than the "
                f"{(st.f_bavail * st.f_frsize) >> 20} MiB free in {staging.path.parent}"
            )
        base = agreed(msg.get("base"), self.base, self.peer)  # None: whole files
        started = time.monotonic()
        if not streamed:
            staging.create()
        source = str(staging.path)
        dir_fd = open_dir(staging.path)
        got: dict[str, str] = {}
        try:
            for n, size in sizes.items():
                fd = create_file(dir_fd, n, source=source)
                try:
                    if base is not None:
                        got[n], counts = receive_planned(self.conn, fd, n, size, base)
                        self.counts.add(counts)
                    else:
                        got[n] = receive_file(self.conn, fd, size)
                        self.counts.sent += size
                except OSError as exc:
                    # A full disk (or any write error): the source is still sending; read the
                    # rest, so that it hears why rather than a channel cut under it.
                    self._drain(total + _dedup.plan_bytes(sizes) if base else total)
                    raise TorporError(
                        f"the disk of {self.where} failed while {n} was received: "
                        f"{staging.path.parent}: {exc.strerror or exc}",
                        hint=f"free space in {staging.path.parent} on {self.where}, then "
                        "migrate again",
                    ) from exc
                finally:
                    os.close(fd)
        finally:
            os.close(dir_fd)
        received = time.monotonic()
        sums = self.conn.recv()
        theirs = sums.get("files")
        if sums.get("type") != "hashes" or not isinstance(theirs, dict):
            raise ChannelError(f"{self.peer} sent no hashes after the image")
        bad = sorted(n for n in sizes if theirs.get(n) != got[n])
        if bad or set(theirs) != set(sizes):
            suspect = base.suspect(self.counts) if base is not None else ""
            raise TorporError(
                f"image from {self.peer} arrived damaged: {', '.join(bad) or 'its file list'} "
                f"did not match the source's SHA-256{suspect}"
            )
        hashed = {n: FileEntry(n, sizes[n], got[n]) for n in sizes} | dict(streamed)
        self.counts.sent += sum(e.size for e in streamed.values())
        total += sum(e.size for e in streamed.values())

        def manifest(entries: list[FileEntry]) -> _manifest.Manifest:
            return _manifest.build(
                name=name,
                pid=int(pid),
                files=entries,
                criu_version=str(facts.get("criu_version", "")),
                cmdline=cmdline,
                rss_bytes=int(rss),
                tcp_established=facts.get("tcp_established") is True,
                shell_job=facts.get("shell_job") is True,
            )

        self.criu_lock = _netlock.criu_name(facts.get("criu_lock"))
        image = staging.commit(manifest, hashed)
        based = base.describe(self.counts) if base is not None else ""
        sealed = time.monotonic()
        self.log(
            f"received {name!r} from {self.peer}: {total} bytes{based}, verified; received "
            f"in {round((received - started) * 1000)} ms, sealed in "
            f"{round((sealed - received) * 1000)} ms"
        )
        return image

    def _drain(self, total: int) -> None:
        """Read and drop the image's remaining ``D`` frames (at most ``total`` bytes, the
        image's announced size) and its ``hashes`` message."""
        left = total
        while True:
            kind, body = self.conn._frame()
            if kind == _DATA and len(body) <= left:
                left -= len(body)
                continue
            if kind != _MSG:
                raise ChannelError(f"{self.peer} sent more file data than announced")
            return

    def _restore(self, image: Image, name: str) -> None:
        conn = self.conn
        started = time.monotonic()
        try:
            # Fenced: the copy is left stopped until the source confirms the original's end,
            # so the two never run at once (a source that dies in between leaves it stopped).
            rec = self.with_addresses(
                lambda: _restore_apart(image, name, stopped=True), recorded=self._recorded
            )
        except TorporError as exc:
            with contextlib.suppress(TorporError):
                conn.send({"type": "failed", "error": exc.msg})
            raise
        took = round((time.monotonic() - started) * 1000, 1)
        try:
            conn.send({"type": "running", "pid": rec.pid, "restore_ms": took, "stopped": True})
        except ChannelError as exc:
            # Not even "running" got through whole: the source cannot have let CRIU kill the
            # original (it does only on a complete "running"), so this copy must go.
            self.abandon(rec)
            self.log(f"{name!r}: 'running' could not be sent ({exc}); copy killed")
            return
        try:
            asked = time.monotonic()
            verdict = conn.recv().get("type")
            # What the fence (the copy runs only once the kill is confirmed) adds.
            confirm_ms = round((time.monotonic() - asked) * 1000, 1)
        except ChannelError as exc:
            # The source may have let CRIU kill the original after our "running", or CRIU
            # may have thawed it: the copy here may be all there is of the process, or a
            # second one. It stays stopped (never two running) and its record says the
            # migration is in doubt (docs/migration.md: `torpor migrate NAME --resolve`).
            self._in_doubt(rec, f"{exc}")
            return
        if verdict == "abort":
            self.abandon(rec)
            self.log(f"{name!r} from {self.peer}: the source resumed its original; copy killed")
            return
        if verdict != "done":
            self._in_doubt(rec, f"it answered {verdict!r}, not done or abort")
            return
        if not self._continue(rec):
            return
        with contextlib.suppress(OSError, TorporError):
            _registry.update(name, rec.ref, migrating=None, migrated_from=self.peer)
        with contextlib.suppress(TorporError):
            conn.send({"type": "continued"})
        for addr in self.addresses:  # again: the source has let them go by now
            with contextlib.suppress(OSError, TorporError):
                _address.announce(addr)
        with contextlib.suppress(OSError, TorporError, ValueError):
            from .._supervise import _events

            _events.append(name, "restore", migrated_from=self.peer, mode="copy")
        moved = f" (of which addresses and lock {self.address_ms} ms)" if self.addresses else ""
        self.outcome = (
            f"{name!r} migrated from {self.peer}: pid {rec.pid}, restored in {took} ms{moved}; "
            f"the source confirmed the original's end {confirm_ms} ms after"
        )

    def _recorded(self, rec: _registry.ManagedProcess) -> None:
        with contextlib.suppress(OSError, TorporError):
            _registry.update(
                rec.name, rec.ref, restored_from=None,
                migrating=f"from {self.peer} (stopped until the source confirms its end)",
                service_addresses=tuple(str(a) for a in self.addresses),
            )  # fmt: skip

    def with_addresses(
        self,
        restore: Callable[[], _registry.ManagedProcess],
        recorded: Callable[[_registry.ManagedProcess], None] | None = None,
    ) -> _registry.ManagedProcess:
        """``restore()`` (any mode's), with the service addresses brought up here first,
        behind a lock that drops their traffic until CRIU has the connections back (a peer's
        retransmission would otherwise meet no socket and get an RST), then the lock lifted
        and the addresses announced; everything undone if it raises. ``recorded(rec)``
        writes the copy's record (its service addresses) before the journal that holds them
        goes, so that one of the two always does (:mod:`._leftovers`). Kill a copy the
        source then aborts with :meth:`abandon`."""
        if not self.addresses:
            rec = restore()
            if recorded is not None:
                recorded(rec)
            return rec
        tag = os.urandom(4).hex()
        # Written first: a server killed from here on leaves them to the next one's sweep;
        # while this server runs, a source's sweep here leaves them be (_leftovers). The
        # sweep deletes the lock only if it bears the tag's mark (_netlock.made_by_block).
        journal = {
            "addresses": [str(a) for a in self.addresses],
            "lock": self.criu_lock,
            "tag": tag,
            "owner": [os.getpid(), start_time(os.getpid())],
        }
        _paths.write_home_file(_JOURNAL, json.dumps(journal).encode())
        brought: list[tuple[_address.IPAddr, _address.Link]] = []
        table: tuple[str, str] | None = None
        try:
            started = time.monotonic()
            try:
                # The peer names it: never a table here already (block's creation then fails).
                table = _netlock.block(tag, self.addresses, criu=self.criu_lock)
            except _netlock.LockTakenError as exc:
                raise _netlock.NetlockError(
                    f"{self.peer} named its lock inet {self.criu_lock}, a table that exists "
                    "here: refused"
                ) from exc
            for addr in self.addresses:
                brought.append((addr, _address.bring_up(addr, self.links or None)))
            # Announced at once: the peers send here from now on, into the lock (the frozen
            # original's host drops it too), so the restored sockets' first packets (window
            # probes, sent when CRIU lifts the lock) meet answers that come here, not there.
            for addr, link in brought:
                with contextlib.suppress(OSError, TorporError):
                    _address.announce(addr, link)
            restoring = time.monotonic()
            rec = restore()
            restored = time.monotonic()
        except BaseException:
            self._take_down([addr for addr, _ in brought])
            if table is not None:
                with contextlib.suppress(TorporError):
                    _netlock.drop(table)
            _clear_journal()
            raise
        # The copy runs (its connections restored): let its traffic through, and tell the
        # subnet again where its addresses are now.
        try:
            # CRIU's restore has lifted a lock named after its dump; any other goes now.
            _netlock.drop(table, known=self.criu_lock is None)
        except TorporError as exc:
            self.log(f"the network lock {table[1]} could not be removed: {exc.msg}")
        for addr, link in brought:
            with contextlib.suppress(OSError, TorporError):
                _address.announce(addr, link)
        self.address_ms = round((restoring - started + time.monotonic() - restored) * 1000, 1)
        if recorded is not None:
            recorded(rec)
        _clear_journal()  # the addresses are the running copy's now
        return rec

    def _take_down(self, addrs: Sequence[_address.IPAddr]) -> None:
        for addr in addrs:
            try:
                _address.take_down(addr)
            except TorporError as exc:
                self.log(f"{addr} could not be removed: {exc.msg}")

    def _continue(self, rec: _registry.ManagedProcess) -> bool:
        """Let the fenced copy ``rec`` run (the source confirmed the original's end):
        whether it could (it is still the process restored, by pid and start time)."""
        from .._process._keeper import continue_tree

        try:
            live = rec.ref.alive()
        except (OSError, TorporError):
            live = False
        if not live:
            self.log(f"{rec.name!r} (pid {rec.pid}) ended before it could be continued")
            return False
        continue_tree(rec.pid)
        return True

    def _in_doubt(self, rec: _registry.ManagedProcess, why: str) -> None:
        doubt = "in doubt: the source went silent; the copy is stopped"
        with contextlib.suppress(OSError, TorporError):
            _registry.update(rec.name, rec.ref, migrating=f"from {self.peer} ({doubt})")
        self.log(f"{rec.name!r} (pid {rec.pid}) is stopped here, migration {doubt}: {why}")

    def abandon(self, rec: _registry.ManagedProcess) -> None:
        """Kill the copy ``rec`` (the source resumed its original), record that, and take
        the service addresses down."""
        self._kill(rec)
        self._take_down(self.addresses)

    def _kill(self, rec: _registry.ManagedProcess) -> None:
        with contextlib.suppress(ProcessNotFoundError, OSError):
            if rec.ref.alive():
                os.kill(rec.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, TorporError):
            _registry.update(
                rec.name, rec.ref, migrating=None,
                restored_from=f"aborted migration ({self.peer})",
            )  # fmt: skip


def _restore_apart(image: Image, name: str, *, stopped: bool = False) -> _registry.ManagedProcess:
    """:func:`_manage.restore` of one copy, apart from the server (:mod:`._apart`)."""
    return run_apart(
        lambda: _manage.restore(image, names=[name], stopped=stopped)[0],
        what=f"the restore of {name}",
    )


def main(listen_at: str) -> int:
    """``torpor agent run --listen ADDR:PORT``: serve in the foreground; "listening on ..."
    on stdout once ready, one line per event on stderr."""
    addr, _, port = listen_at.rpartition(":")
    if not addr or not port.isdigit() or int(port) > 65535:
        raise TorporError(
            f"--listen {listen_at!r} is not ADDR:PORT", hint="e.g. --listen 10.0.0.2:7070"
        )

    def ready(where: str) -> None:
        print(f"listening on {where}", flush=True)

    def log(line: str) -> None:
        print(f"torpor-migrate: {line}", file=sys.stderr, flush=True)

    serve(addr.strip("[]"), int(port), ready=ready, log=log)
    return 0
