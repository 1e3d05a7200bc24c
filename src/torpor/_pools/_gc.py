"""Garbage collection, and the protocol that makes it safe next to concurrent writers.

The danger
    A writer (push, copy, import) decides *not* to upload a chunk because the pool has it,
    then writes its manifest last. A collector that listed the manifests before that manifest
    landed sees the chunk as garbage; if it deletes the chunk, the new manifest points at
    nothing. New packs a writer has stored but not yet referenced are garbage-looking too.

The protocol (mark, condemn, wait, re-mark, sweep)
    *Sessions.* Every writer and reader registers ``sessions/<id>`` before it reads the pool's
    index and refreshes its heartbeat (a wall-clock time in the object) every
    :attr:`Timing.heartbeat` seconds until it is done; writers delete it after their manifest
    is stored.

    *Condemned set.* ``gc/condemned`` lists the packs and list objects a collection is about
    to delete. A session loads it right after registering and treats condemned chunks as
    absent: a push uploads them again (into new packs), a copy re-packs them, nobody starts
    a patch from a condemned list object. Sessions and the condemned set live in
    :mod:`._session`, a floor below both this module and the pool.

    A collection then runs, holding ``gc/lock-<time>-<id>`` (one collector per pool; the
    older lock wins, a lock whose heartbeat is older than :attr:`Timing.stale` is broken):

    1. *Mark*: read every manifest, resolve its chunk lists, and find the packs that hold no
       referenced chunk (and packs without an index: interrupted uploads), the list objects
       no manifest names, and — if repacking — the packs mostly dead.
    2. *Repack* (optional): copy the live chunks of mostly-dead packs into new packs; the old
       packs join the dead ones. Chunks are verified on the way.
    3. *Condemn*: store ``gc/condemned``. From now on no *new* session relies on them.
    4. *Wait*: list ``sessions/`` and wait until each of those sessions — the only ones that
       may have decided to rely on a condemned chunk — has ended. A session whose heartbeat
       is older than :attr:`Timing.stale` is declared dead and its object deleted; a writer
       checks that its session object still exists right before storing its manifest, and
       gives up if not, so a writer that was merely frozen cannot land a manifest late.
    5. *Re-mark*: read the manifests again. A condemned pack holding a chunk that a manifest
       now needs, and that exists in no other pack, is resurrected (kept); likewise list
       objects.
    6. *Sweep*: delete each remaining condemned pack's index, then the pack; then the list
       objects; then ``gc/condemned``.

    No clock is compared across hosts except for staleness (minutes, not milliseconds), and
    the only window left is a writer frozen for longer than :attr:`Timing.stale` between its
    last check and its manifest write.

Repacking
    Packs whose live chunks are less than ``repack`` (default one half) of their bytes are
    rewritten; packs more alive than that keep their dead chunks, reported as
    ``dead_bytes_kept``.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from .._errors import PoolError
from ._backend import Backend
from ._pack import (
    PackDamagedError,
    PackIndex,
    PackWriter,
    index_key,
    iter_pack,
    pack_key,
    pack_limit,
)
from ._reader import FETCHERS, PoolReader, bounded
from ._record import LISTS_PREFIX, list_key
from ._session import CONDEMNED_KEY, SESSIONS_PREFIX, Condemned, Heartbeat, Timing, read_beat
from ._session import session as session  # sessions are part of the protocol described here

GC_LOCK_PREFIX = "gc/lock-"


def gc_lock(backend: Backend, timing: Timing, pool: str) -> Heartbeat:
    """Take the pool's collector lock (started), or raise :class:`PoolError` if taken."""
    lock = Heartbeat(
        backend, f"{GC_LOCK_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex}", "gc", timing
    )
    lock.start()
    try:
        for other in sorted(backend.list(GC_LOCK_PREFIX)):
            if other >= lock.key:
                continue
            info = read_beat(backend, other)
            if info is None:
                continue
            if time.time() - float(info["beat"]) > timing.stale:
                backend.delete(other)
                continue
            raise PoolError(
                f"another gc is running on pool {pool!r} "
                f"(host {info.get('host', '?')}, pid {info.get('pid', '?')})",
                pool=pool,
                hint="wait for it to finish; a crashed gc's lock expires by itself",
            )
    except BaseException:
        lock.stop()
        raise
    return lock


def wait_for_sessions(
    backend: Backend, keys: set[str], timing: Timing, *, timeout: float, pool: str
) -> float:
    """Wait until every session in ``keys`` has ended or gone stale; return the seconds spent.

    Stale sessions are deleted (their writer then refuses to store its manifest).
    """
    started = time.monotonic()
    pending = set(keys)
    while True:
        for key in sorted(pending):
            info = read_beat(backend, key)
            if info is None:
                pending.discard(key)
            elif time.time() - float(info["beat"]) > timing.stale:
                backend.delete(key)
                pending.discard(key)
        if not pending:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise PoolError(
                f"gc of pool {pool!r} gave up after {timeout:.0f}s waiting for "
                f"{len(pending)} running push/pull/copy session(s); nothing was deleted",
                pool=pool,
                hint="run `torpor pool gc` again when the transfers are done",
            )
        time.sleep(timing.poll)


@dataclass(frozen=True)
class GcStats:
    """What a collection found and did. Byte counts of chunks are uncompressed sizes."""

    images: int
    packs: int
    packs_deleted: int
    packs_repacked: int
    lists_deleted: int
    bytes_freed: int
    live_bytes: int
    dead_bytes_kept: int
    resurrected: int
    missing_chunks: int
    waited: float


def _locations(
    pool: PoolReader,
) -> tuple[dict[str, PackIndex], dict[bytes, list[str]], dict[bytes, int]]:
    indexes = pool._load_indexes(strict=True)
    where: dict[bytes, list[str]] = defaultdict(list)
    length: dict[bytes, int] = {}
    for idx in indexes.values():
        for c in idx.chunks:
            where[c.digest].append(idx.pack_id)
            length[c.digest] = c.length
    return indexes, where, length


def _size(backend: Backend, key: str) -> int:
    try:
        return backend.size(key)
    except KeyError:
        return 0


def _repack(
    pool: PoolReader,
    indexes: dict[str, PackIndex],
    pack_ids: Sequence[str],
    live: dict[str, set[bytes]],
) -> set[str]:
    """Copy the ``live`` chunks of ``pack_ids`` into new packs; the packs copied whole.

    A pack that is missing or holds a damaged live chunk is left alone.
    """
    writer = PackWriter(pool.backend, level=pool.level)
    lock = threading.Lock()

    def one(pack_id: str) -> str | None:
        try:
            data = pool.backend.get(pack_key(pack_id), limit=pack_limit(indexes[pack_id]))
            chunks = list(iter_pack(data, indexes[pack_id], live[pack_id]))
        except (KeyError, PackDamagedError):
            return None
        if any(hashlib.sha256(c).digest() != d for d, c in chunks):
            return None
        with lock:
            for d, c in chunks:
                writer.add(d, c)
        return pack_id

    try:
        done = {p for p in bounded(one, pack_ids, workers=FETCHERS, window=FETCHERS) if p}
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return done


def collect(pool: PoolReader, *, repack: float, wait: float) -> GcStats:
    """Run one collection on ``pool`` (see the module docstring)."""
    backend = pool.backend
    lock = gc_lock(backend, pool.timing, pool.name)
    try:
        records = pool._records()
        refs, list_refs = pool._references(records)
        indexes, where, length = _locations(pool)
        stored_packs = {key.rsplit("/", 1)[-1] for key in backend.list("packs/")}
        orphans = stored_packs - indexes.keys()
        total = {p: sum(c.length for c in idx.chunks) for p, idx in indexes.items()}
        live = dict.fromkeys(indexes, 0)
        live_chunks: dict[str, set[bytes]] = defaultdict(set)
        missing = 0
        for d in refs:
            packs = where.get(d)
            if not packs:
                missing += 1
                continue
            # Prefer the newest copy: repacks write newer packs, so old packs drain.
            p = max(packs, key=lambda p: (indexes[p].created, p))
            live_chunks[p].add(d)
            live[p] += length[d]
        dead = {p for p, n in live.items() if n == 0} | orphans
        mostly_dead = [p for p, n in live.items() if 0 < n < repack * total[p]]
        repacked = _repack(pool, indexes, mostly_dead, live_chunks) if mostly_dead else set()
        doomed = dead | repacked
        all_lists = {k[len(LISTS_PREFIX) :] for k in backend.list(LISTS_PREFIX)}
        doomed_lists = all_lists - list_refs
        freed = resurrected = 0
        waited = 0.0
        if doomed or doomed_lists:
            Condemned(frozenset(doomed), frozenset(doomed_lists)).store(backend)
            try:
                sessions = set(backend.list(SESSIONS_PREFIX))
                waited = wait_for_sessions(
                    backend, sessions, pool.timing, timeout=wait, pool=pool.name
                )
                refs2, list_refs2 = pool._references(pool._records())
                indexes2, where2, _ = _locations(pool)
                keep: set[str] = set()
                for d in refs2:
                    packs = where2.get(d, [])
                    if packs and all(p in doomed for p in packs):
                        keep.add(max(packs, key=lambda p: (indexes2[p].created, p)))
                resurrected = len(keep) + len(doomed_lists & list_refs2)
                doomed -= keep
                doomed_lists -= list_refs2
                for p in sorted(doomed):
                    freed += indexes2[p].size if p in indexes2 else _size(backend, pack_key(p))
                    backend.delete(index_key(p))
                    backend.delete(pack_key(p))
                    pool._cache_drop("index", p)
                for lid in sorted(doomed_lists):
                    backend.delete(list_key(lid))
            finally:
                backend.delete(CONDEMNED_KEY)
        kept_dead = sum(total[p] - live[p] for p in indexes if p not in doomed and p not in dead)
        return GcStats(
            images=len(records),
            packs=len(stored_packs),
            packs_deleted=len(doomed),
            packs_repacked=len(repacked & doomed),
            lists_deleted=len(doomed_lists),
            bytes_freed=freed,
            live_bytes=sum(live.values()),
            dead_bytes_kept=kept_dead,
            resurrected=resurrected,
            missing_chunks=missing,
            waited=waited,
        )
    finally:
        lock.stop()
