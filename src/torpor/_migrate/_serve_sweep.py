"""What a migration server that was killed left behind, removed by the next one to start
(:func:`_sweep`, one server per home at a time), and the journal of the service addresses a
restore under way brought up (:data:`_JOURNAL`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable

from .. import _paths
from .._errors import TorporError
from .._process import _registry
from . import _address, _netlock

_IN_TRANSIT = ".migrating-"  # in the names of image directories being received
_JOURNAL = "migrate-inflight.json"  # service addresses brought up for a restore under way


def _sweep(log: Callable[[str], None]) -> None:
    """Remove what a killed server left (one server per home at a time): half-received
    images, the service addresses it brought up for a copy that never ran, its network
    locks."""
    images = _paths.images_dir()
    for entry in os.listdir(images):
        if _IN_TRANSIT in entry:
            shutil.rmtree(images / entry, ignore_errors=True)
            log(f"removed {images / entry}, left by a migration that did not finish")
    left = _paths.read_home_file(_JOURNAL)
    if left is not None:
        try:
            journal = json.loads(left)
            listed, lock = journal.get("addresses", []), journal.get("lock")
        except (ValueError, AttributeError):
            listed, lock = [], None
        if _netlock.criu_name(lock) is not None:
            with contextlib.suppress(TorporError):
                if _netlock.drop(("inet", str(lock))):
                    log(f"removed the network lock inet {lock}, left by a migration")
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


def _clear_journal() -> None:
    with contextlib.suppress(OSError):
        os.unlink(_paths.home() / _JOURNAL)
