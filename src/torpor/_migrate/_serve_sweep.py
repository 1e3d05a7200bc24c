"""What a migration server that was killed left behind, removed by the next one to start
(:func:`_sweep`, one server per home at a time), and the journal of the service addresses a
restore under way brought up (:data:`_JOURNAL`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .. import _paths
from .._errors import TorporError, UsageError
from .._images._image import STAGING_MARK
from .._images._store import check_name
from .._process import _registry
from .._process._proc import ProcRef
from . import _address, _netlock

_IN_TRANSIT = ".migrating-"  # in the names of image directories being received
_JOURNAL = "migrate-inflight.json"  # service addresses brought up for a restore under way
_MAX_JOURNAL = 64 << 10  # bytes of it read
_MAX_ADDRESSES = 256  # addresses of it believed
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


def _sweep(log: Callable[[str], None]) -> None:
    """Remove what a killed server left (one server per home at a time): half-received
    images, the service addresses it brought up for a copy that never ran, its network
    locks."""
    images = _paths.images_dir()
    for entry in os.listdir(images):
        if is_in_transit(entry):
            shutil.rmtree(images / entry, ignore_errors=True)
            log(f"removed {images / entry}, left by a migration that did not finish")
    left = _paths.read_home_file(_JOURNAL)
    if left is not None:
        try:
            journal = json.loads(left)
        except (ValueError, RecursionError):
            journal = None
        if not isinstance(journal, dict):
            journal = {}
        listed, lock, tag = journal.get("addresses", []), journal.get("lock"), journal.get("tag")
        if _netlock.criu_name(lock) is not None:
            named = ("inet", str(lock))
            with contextlib.suppress(TorporError):
                # Only the lock the server made: the journal is written before the table,
                # whose creation fails if another's has that name (_netlock).
                made = _netlock.made_by_block(named, tag)
                if made and _netlock.drop(named, known=True):
                    log(f"removed the network lock inet {lock}, left by a migration")
                elif made is False:
                    log(f"kept the table inet {lock} a migration's journal names: not its lock")
        addrs = []
        for item in listed if isinstance(listed, list) else []:
            with contextlib.suppress(TorporError):  # each on its own: one bad entry skips one
                addrs.append(_address.parse(item))
        used = {
            a for r in _registry.list_all() if r.state == "running" for a in r.service_addresses
        }
        for addr in addrs:
            if str(addr) not in used:
                with contextlib.suppress(TorporError):
                    if _address.take_down(addr):
                        log(f"removed {addr}, brought up by a migration that did not finish")
        _clear_journal()
    # A copy restored by a server that ended before the source's verdict: whether the source
    # committed is unknown, so it runs on, and says so (docs/migration.md).
    for rec in _registry.list_all():
        mark = rec.migrating or ""
        if rec.state == "running" and mark.startswith("from ") and "(in doubt" not in mark:
            doubt = "in doubt: the server ended before the source's verdict"
            with contextlib.suppress(OSError, TorporError):
                _registry.update(rec.name, rec.ref, migrating=f"{mark} ({doubt})")
            log(f"{rec.name!r} (pid {rec.pid}) runs here, migration {doubt}")
    with contextlib.suppress(TorporError):
        for table in _netlock.sweep():
            log(f"removed the network lock {table}, left by a migration that did not finish")


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
