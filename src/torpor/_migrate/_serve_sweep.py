"""What a migration server that was killed left behind, removed by the next one to start
(:func:`_sweep`, one server per home at a time), and the journals it leaves for that: of the
service addresses a restore under way brought up (:data:`_JOURNAL`), and of the image
directories it is receiving (:data:`_TRANSIT`).

**Only what a server made is removed.** A name is no proof: ``NAME.migrating-<8 hex>`` is a
name a user may give an image too (``check_name`` allows it), and rmtree of a user's image
loses it. So before it makes the directories of an image in transit (its staging directory
and the image that one becomes: :func:`record_transit`), the server names them in
:data:`_TRANSIT`, a file of the home (0600, written through ``O_EXCL``/``O_NOFOLLOW`` and
renamed into place; read back only if torpor could have written it), and removes that once
they are gone (:func:`forget_transit`). The sweep removes an entry of the images directory only
if the journal names it and it is, seen from a descriptor of that directory without following
anything, a directory of this server's user: a symlink or a file planted under a recorded name
is left alone, and so is every directory merely named like one in transit (logged).

Why a journal and not a marker file inside the directory: that directory becomes the sealed
image (:meth:`Staging.commit <torpor._images._image.Staging.commit>`), whose files are exactly
the ones sealed, and a marker would have to be kept out of the seal and out of the restore; it
would also be read from inside a directory of the images directory, which anyone with the
image could have made. The journal is the home's own, like :data:`_JOURNAL`. Its names are
random (``os.urandom``) and checked free before they are recorded, so it cannot name a
directory that existed before (a user could make one of that name only after seeing it, by
when it is the server's)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _paths
from .._errors import TorporError, UsageError
from .._images._image import STAGING_MARK, Staging, check_free
from .._images._store import check_name
from .._process import _registry
from .._process._proc import ProcRef, start_time
from .._safe import open_dir
from . import _address, _netlock

_IN_TRANSIT = ".migrating-"  # in the names of image directories being received
_JOURNAL = "migrate-inflight.json"  # service addresses brought up for a restore under way
_MAX_JOURNAL = 64 << 10  # bytes of it read
_MAX_ADDRESSES = 256  # addresses of it believed
_TRANSIT = "migrate-transit.json"  # the image directories being received (made or to be)
# Exactly what in_transit() makes: NAME.migrating-HEX (the received image, sealed) and its
# staging directory .NAME.migrating-HEX.partial-HEX (Staging), NAME a process name.
_HEX = "[0-9a-f]{8}"
_MADE = re.compile(
    rf"(?:\.(?P<s>.+){re.escape(_IN_TRANSIT)}{_HEX}{re.escape(STAGING_MARK)}{_HEX}"
    rf"|(?P<d>.+){re.escape(_IN_TRANSIT)}{_HEX})\Z"
)


def in_transit(name: str) -> Path:
    """Where the image of process ``name`` is received, in the images directory: a name
    :func:`is_in_transit` knows (``NAME.migrating-`` and 8 lowercase hex digits)."""
    return _paths.images_dir() / f"{name}{_IN_TRANSIT}{os.urandom(4).hex()}"


def is_in_transit(entry: str) -> bool:
    """Whether ``entry`` of the images directory is a received image or its staging
    directory, as :func:`in_transit` and :class:`~torpor._images._image.Staging` name them
    (an image a user named ``db.migrating-2`` is not)."""
    m = _MADE.match(entry)
    if m is None:
        return False
    try:
        check_name(m["s"] or m["d"], what="process name")
    except UsageError:
        return False
    return True


def record_transit(staging: Staging) -> None:
    """Name ``staging``'s directory and the image it becomes in :data:`_TRANSIT`, before
    either is made (see the module docstring); :class:`~torpor.AlreadyExistsError` if one
    exists already (never recorded, so never swept)."""
    check_free(staging.dest)
    check_free(staging.path)
    pid = os.getpid()
    journal = {"dirs": [staging.dest.name, staging.path.name], "owner": [pid, start_time(pid)]}
    _paths.write_home_file(_TRANSIT, json.dumps(journal).encode())


def forget_transit() -> None:
    """Remove :data:`_TRANSIT` (the directories it names are gone)."""
    with contextlib.suppress(OSError):
        os.unlink(_paths.home() / _TRANSIT)


def _recorded_transit() -> set[str] | None:
    """The image directories :data:`_TRANSIT` names (only names :func:`is_in_transit`
    knows), read as hostile; None if the server that wrote it still runs (not ours to take)."""
    raw = _paths.read_home_file(_TRANSIT, limit=_MAX_JOURNAL)
    try:
        journal = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        return set()
    if not isinstance(journal, dict):
        return set()
    if _live_owner(journal) is not None:
        return None
    dirs = journal.get("dirs")
    if not isinstance(dirs, list):
        return set()
    return {d for d in dirs[:2] if isinstance(d, str) and is_in_transit(d)}


def _live_owner(journal: dict[str, Any]) -> int | None:
    """The pid of the server that wrote ``journal`` (its ``owner``: pid and start time) if
    that very process, not this one, still runs; None if it has ended or the journal names
    no owner it could have written (a server too old to name itself: the home's lock,
    :mod:`._serve_start`, now keeps two servers of one home from running at once)."""
    owner = journal.get("owner")
    if not isinstance(owner, list) or len(owner) != 2 or owner[0] == os.getpid():
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in owner):
        return None
    pid, start = owner
    return pid if 0 < pid < 1 << 31 and ProcRef(pid, start).alive() else None


def _not_removable(images_fd: int, entry: str) -> str | None:
    """Why the recorded ``entry`` of the images directory (its fd) is not the directory the
    server made, or None: seen without following a symlink, it must be a directory of ours."""
    try:
        st = os.stat(entry, dir_fd=images_fd, follow_symlinks=False)
    except OSError as exc:
        return f"cannot be looked at ({exc.strerror or exc})"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory (a symlink is never followed)"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not this server's"
    return None


def _sweep_transit(log: Callable[[str], None]) -> None:
    """Remove the image directories :data:`_TRANSIT` names (the module docstring says
    which); every other entry named like one is left, and said so."""
    recorded = _recorded_transit()
    if recorded is None:
        log(f"left the images in transit alone: the server that recorded them in {_TRANSIT} runs")
        return
    images = _paths.images_dir()
    fd = open_dir(images)
    try:
        for entry in sorted(os.listdir(fd)):
            if not is_in_transit(entry):
                continue
            if entry not in recorded:
                log(
                    f"left {images / entry} alone: named like an image in transit, but no "
                    "migration of this home recorded it (remove it by hand if it is a leftover)"
                )
                continue
            why = _not_removable(fd, entry)
            if why is not None:
                log(f"left {images / entry} alone: {why}")
                continue
            # Relative to the directory's fd, never following a symlink (rmtree's fd walk).
            shutil.rmtree(entry, ignore_errors=True, dir_fd=fd)
            log(f"removed {images / entry}, left by a migration that did not finish")
    finally:
        os.close(fd)
    forget_transit()


def _sweep(log: Callable[[str], None]) -> None:
    """Remove what a killed server of this home left (run with the home's server lock held,
    :mod:`._serve_start`): half-received images (only those it recorded), the service
    addresses it brought up for a copy that never ran and the network lock its journal
    names (only if it bears the journal's mark: other homes' servers lock on this host
    too), and the service addresses of copies it restored that died before their
    migration settled (:func:`release_addresses`). A journal whose server still runs is
    left whole."""
    _sweep_transit(log)
    left = _paths.read_home_file(_JOURNAL, limit=_MAX_JOURNAL)
    if left is not None:
        try:
            journal = json.loads(left)
        except (ValueError, RecursionError):
            journal = None
        if not isinstance(journal, dict):
            journal = {}
        owner = _live_owner(journal)
        if owner is not None:
            log(
                f"left the service addresses and lock of {_JOURNAL} alone: the server that "
                f"recorded them (pid {owner}) runs"
            )
        else:
            _sweep_journal(journal, log)
    # A copy restored by a server that ended before the source's verdict: whether the source
    # committed is unknown, so it runs on, and says so (docs/migration.md).
    for rec in _registry.list_all():
        mark = rec.migrating or ""
        if rec.state == "running" and mark.startswith("from ") and "(in doubt" not in mark:
            doubt = "in doubt: the server ended before the source's verdict"
            with contextlib.suppress(OSError, TorporError):
                _registry.update(rec.name, rec.ref, migrating=f"{mark} ({doubt})")
            log(f"{rec.name!r} (pid {rec.pid}) runs here, migration {doubt}")
        elif rec.state != "running" and mark.startswith("from ") and rec.service_addresses:
            for line in release_addresses(rec):
                log(line)


def _sweep_journal(journal: dict[str, Any], log: Callable[[str], None]) -> None:
    """Undo what the ended server that wrote ``journal`` (:data:`_JOURNAL`) brought up."""
    listed = journal.get("addresses", [])
    named = _netlock.lock_table(journal.get("lock"), journal.get("tag"))
    if named is not None:
        with contextlib.suppress(TorporError):
            # Only the lock the server made: the journal is written before the table,
            # whose creation fails if another's has that name (_netlock).
            made = _netlock.made_by_block(named, journal.get("tag"))
            if made and _netlock.drop(named, known=True):
                log(f"removed the network lock inet {named[1]}, left by a migration")
            elif made is False:
                log(f"kept the table inet {named[1]} a migration's journal names: not its lock")
    addrs = []
    for item in listed[:_MAX_ADDRESSES] if isinstance(listed, list) else []:
        with contextlib.suppress(TorporError):  # each on its own: one bad entry skips one
            addrs.append(_address.parse(item))
    used = {a for r in _registry.list_all() if r.state == "running" for a in r.service_addresses}
    for addr in addrs:
        if str(addr) not in used:
            with contextlib.suppress(TorporError):
                if _address.take_down(addr):
                    log(f"removed {addr}, brought up by a migration that did not finish")
    _clear_journal()


def release_addresses(rec: _registry.ManagedProcess) -> list[str]:
    """Take down the service addresses of ``rec``, a migrated copy killed (or ended) before
    its migration settled, that nothing alive here holds: no other running managed
    process's record, no live server's journal (:func:`inflight_addresses`: a copy on its
    way in). Once each is down (or kept), the record no longer names them, so that no later
    sweep takes down an address brought up since. What was done, one line each.

    The copy's keeper calls this when it kills a half-moved copy (:mod:`._lazy_target`): the
    server that would take them down (``abandon``) may be dead, and the source, which takes
    them back for the resumed original, would then share them with this host."""
    held = inflight_addresses()
    for other in _registry.list_all():
        if other.name != rec.name and other.state == "running":
            for text in other.service_addresses:
                with contextlib.suppress(TorporError):
                    held.add(_address.parse(text).ip)
    out, failed = [], False
    for text in rec.service_addresses[:_MAX_ADDRESSES]:
        try:
            addr = _address.parse(text)
        except TorporError:
            continue
        if addr.ip in held:
            out.append(f"kept {addr} of {rec.name!r}: a running process or migration holds it")
            continue
        try:
            if _address.take_down(addr):
                out.append(f"removed {addr} of {rec.name!r}, whose migration did not finish")
        except TorporError as exc:
            failed = True
            out.append(f"warning: {addr} of {rec.name!r} could not be removed: {exc.msg}")
    if not failed:
        with contextlib.suppress(OSError, TorporError):
            _registry.update(rec.name, rec.ref, service_addresses=())
    return out


def inflight_addresses() -> set[object]:
    """The addresses (``ip``) a live server of this home has brought up for an incoming copy
    that may not run yet: its :data:`_JOURNAL`, read as hostile (a file of torpor's own,
    bounded; each address parsed alone). A journal whose server has ended holds nothing (the
    next server's sweep takes them down); one of a server too old to name itself holds all."""
    raw = _paths.read_home_file(_JOURNAL, limit=_MAX_JOURNAL)
    try:
        journal = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        return set()
    if not isinstance(journal, dict) or not isinstance(journal.get("addresses"), list):
        return set()
    owner = journal.get("owner")
    if owner is not None:
        ok = isinstance(owner, list) and len(owner) == 2
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in owner)
        if not ok or not 0 < owner[0] < 1 << 31 or not ProcRef(*owner).alive():
            return set()
    held: set[object] = set()
    for item in journal["addresses"][:_MAX_ADDRESSES]:
        with contextlib.suppress(TorporError):
            held.add(_address.parse(item).ip)
    return held


def _clear_journal() -> None:
    with contextlib.suppress(OSError):
        os.unlink(_paths.home() / _JOURNAL)
