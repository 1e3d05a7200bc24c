"""What a migration's source must undo after its commit, kept where a killed command leaves it.

Once CRIU has killed the original (the commit: ``post-dump`` answered true), the source still
has two things to undo (docs/migration.md): the service addresses, which are the target's now,
and CRIU's lock table ``inet CRIU-<run id>``, which CRIU leaves after a dump that killed the
tree. A ``torpor migrate`` killed between the commit and that clean-up would leave both for
good. So the source notes them first, in a journal of its home, and whoever comes next
finishes the work:

- :func:`record` (before the commit): one journal, ``<home>/migrate-undo/<16 hex>.json``,
  written whole or not at all, naming the process, the original (pid and start time), the
  command that writes it (its *owner*, pid and start time), this boot, the CRIU tables and the
  addresses. If it cannot be written the source must not commit (answer CRIU false).
- :func:`settle` (by that command, once its own clean-up is done, whatever the outcome):
  undo what is still left of that journal and remove it.
- :func:`sweep` (``torpor ps``, ``torpor migrate``, ``torpor agent start``): the same for the
  journals whose owner has ended, i.e. those of killed commands.

Every journal is read as hostile (a plain regular file of this home's, bounded, every field
checked: the tables by :func:`._netlock.criu_name`, the addresses by :func:`._address.parse`)
and is acted on only so:

- a journal of another boot is removed and nothing else: the kernel state it names is gone;
- the original still runs (that very pid and start time) and CRIU no longer holds it (no
  tracer): CRIU thawed it, the migration was rolled back, CRIU removed its lock itself and
  the addresses are the original's: only the journal goes. Still traced: CRIU is between the
  answer and the kill; the journal is left for later;
- the original is gone (the commit): each address goes down, unless a running managed
  process's record holds it, or this host's migration server (alive) has just brought it up
  for an incoming copy (its ``migrate-inflight.json``, read as hostile too:
  :func:`._serve_sweep.inflight_addresses`); then each CRIU table is deleted (in that
  order, as the command does: until the address has left, the lock keeps this host from
  answering the peers' packets with resets); the journal goes once both are done, and stays
  (for the next sweep) if one failed.

The journal is not fsynced: the kernel state it describes (nftables tables, addresses) does
not survive a crash of the host either, and writing it falls in the migration's downtime.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import _paths
from .._errors import TorporError
from .._process._proc import ProcRef, stat_fields
from .._safe import (
    TEMP_PREFIX,
    is_plain_name,
    open_dir,
    open_regular,
    private_file_problem,
    replace_file,
)
from . import _address, _netlock

DIR_NAME = _paths.MIGRATE_UNDO
MAX_JOURNAL = 16 << 10  # bytes: a journal is a few hundred
MAX_TABLES = 8  # CRIU makes one lock table per dump
TEMP_GRACE = 60.0  # seconds after which a temporary file of a killed writer is removed
_FILE = re.compile(r"[0-9a-f]{16}\.json\Z")
_BOOT = re.compile(r"[0-9a-f-]{36}\Z")
_TARGET = re.compile(r"[!-~]{1,300}\Z")  # printable, no spaces: it goes into messages
_MAX_PID = (1 << 31) - 1
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


class JournalError(TorporError):
    """A journal of this home that torpor did not write (or not whole)."""


@dataclass(frozen=True)
class Journal:
    """What one migration's source must undo once its original is gone."""

    path: Path
    name: str  # the managed process migrated
    target: str  # HOST:PORT, for messages
    original: ProcRef  # the process CRIU dumped
    owner: ProcRef  # the command that wrote the journal
    boot_id: str
    tables: tuple[tuple[str, str], ...]  # CRIU's lock tables, ("inet", "CRIU-...")
    addresses: tuple[_address.IPAddr, ...]


def journal_dir() -> Path:
    """``<home>/migrate-undo`` (created 0700)."""
    return _paths.private_dir(_paths.home() / DIR_NAME, what="migration journal directory")


def record(
    name: str,
    original: ProcRef,
    *,
    target: str,
    tables: Iterable[tuple[str, str]],
    addresses: Sequence[_address.IPAddr],
) -> Path | None:
    """Note, before the commit, what the source must undo once CRIU has killed ``original``:
    CRIU's lock ``tables`` and the service ``addresses``; the journal's path (for
    :func:`settle`), or None if there is nothing to undo. :class:`OSError` or
    :class:`~torpor.TorporError` if it cannot be written: then do not commit."""
    names = sorted({t[1] for t in tables if t[0] == "inet"})
    bad = [t for t in names if _netlock.criu_name(t) is None]
    if bad or len(names) > MAX_TABLES:
        raise JournalError(f"not CRIU lock tables: {', '.join(bad) or names}")
    if not names and not addresses:
        return None
    me = _me()
    data = {
        "version": 1,
        "name": name,
        "target": target,
        "original": [original.pid, original.start_time],
        "owner": [me.pid, me.start_time],
        "boot_id": _boot_id(),
        "tables": names,
        "addresses": [str(a) for a in addresses],
    }
    file = f"{os.urandom(8).hex()}.json"
    directory = journal_dir()
    dir_fd = open_dir(directory)
    try:
        replace_file(dir_fd, file, json.dumps(data).encode(), source=str(directory), durable=False)
    finally:
        os.close(dir_fd)
    return directory / file


def settle(path: Path | None) -> list[str]:
    """By the command that wrote ``path`` (:func:`record`), once its own clean-up is done:
    undo what is still left (see the module docstring) and remove the journal; one line per
    thing undone or left."""
    if path is None:
        return []
    try:
        journal = load(path)
    except FileNotFoundError:
        return []
    except (OSError, TorporError) as exc:
        return [f"warning: {path} cannot be read: {exc}"]
    return _undo(journal)


def sweep() -> list[str]:
    """Finish what killed migrations left on this source: :func:`settle` each journal whose
    owner has ended; one line per thing undone, left or refused. Best effort: an unusable
    home or an unreadable journal is reported, never raised."""
    try:
        directory = journal_dir()
        entries = sorted(os.listdir(directory))
    except (OSError, TorporError):
        return []
    out: list[str] = []
    for entry in entries:
        path = directory / entry
        if entry.startswith(TEMP_PREFIX):
            _drop_temp(path)
            continue
        try:
            journal = load(path)
        except FileNotFoundError:
            continue  # settled by its owner meanwhile
        except (OSError, TorporError) as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)
            out.append(f"removed {path}: {exc} (its leftovers, if any, are not known)")
            continue
        if journal.owner.alive():
            continue  # that migration is under way: its command cleans up
        out += _undo(journal)
    return out


def load(path: Path) -> Journal:
    """The journal at ``path``, checked field by field (:class:`JournalError` if it is not
    one torpor wrote; :class:`FileNotFoundError` if there is none)."""
    if not _FILE.match(path.name):
        raise JournalError(f"{path.name!r} is not the name of a journal")
    dir_fd = open_dir(path.parent)
    try:
        fd = open_regular(dir_fd, path.name, source=str(path.parent))
    finally:
        os.close(dir_fd)
    try:
        problem = private_file_problem(os.fstat(fd))
        if problem is not None:
            raise JournalError(f"it {problem}")
        raw = os.read(fd, MAX_JOURNAL + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_JOURNAL:
        raise JournalError(f"it is longer than {MAX_JOURNAL} bytes")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise JournalError("it is not JSON") from exc
    if not isinstance(data, dict) or data.get("version") != 1:
        raise JournalError("it is not a version 1 journal")
    name, target, boot = data.get("name"), data.get("target"), data.get("boot_id")
    if not is_plain_name(name):
        raise JournalError("its name is not a process name")
    if not isinstance(target, str) or not _TARGET.match(target):
        raise JournalError("its target is not HOST:PORT")
    if not isinstance(boot, str) or not _BOOT.match(boot):
        raise JournalError("its boot id is not one")
    tables, addrs = data.get("tables"), data.get("addresses")
    if not isinstance(tables, list) or len(tables) > MAX_TABLES:
        raise JournalError("its tables are not a short list")
    checked = [_netlock.criu_name(t) for t in tables]
    if any(t is None for t in checked):
        raise JournalError("it names a table that is not CRIU's lock")
    if not isinstance(addrs, list):
        raise JournalError("its addresses are not a list")
    return Journal(
        path=path,
        name=str(name),
        target=target,
        original=_ref(data.get("original"), "original"),
        owner=_ref(data.get("owner"), "owner"),
        boot_id=boot,
        tables=tuple(("inet", str(t)) for t in checked),
        addresses=_address.parse_all(addrs),  # AddressError names the bad one
    )


def _ref(value: object, what: str) -> ProcRef:
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 0 < value[0] <= _MAX_PID
        and value[1] >= 0
    )
    if not ok:
        raise JournalError(f"its {what} is not [pid, start time]")
    assert isinstance(value, list)
    return ProcRef(int(value[0]), int(value[1]))


def _undo(journal: Journal) -> list[str]:
    """Act on ``journal`` as the module docstring says; what was done, one line each."""
    what = f"{journal.name} (migrated to {journal.target})"
    if journal.boot_id != _boot_id():
        _remove(journal.path)
        return []
    if journal.original.alive():
        if _traced(journal.original.pid):
            return []  # CRIU still holds it: the kill or the thaw is a moment away
        _remove(journal.path)  # thawed: CRIU unlocked, the addresses are the original's
        return []
    try:
        held = _held_by_running()
    except (OSError, TorporError) as exc:
        return [f"warning: {journal.path} is kept: the records here cannot be read ({exc})"]
    out: list[str] = []
    left = False
    for addr in journal.addresses:
        if addr.ip in held:
            continue  # a running managed process here has it (one that came back)
        try:
            if _address.take_down(addr):
                out.append(f"removed {addr}, left here by the migration of {what}")
        except TorporError as exc:
            left = True
            out.append(f"warning: {addr} could not be removed here: {exc.msg}")
    for table in journal.tables:
        try:
            if _netlock.drop(table):
                out.append(f"removed CRIU's network lock {table[0]} {table[1]}, left by {what}")
        except TorporError as exc:
            left = True
            out.append(f"warning: CRIU's network lock {table[1]} is left here: {exc.msg}")
    if not left:
        _remove(journal.path)
    return out


def _held_by_running() -> set[object]:
    """The addresses this host's running managed processes hold, and those its migration
    server has just brought up for an incoming copy that is not recorded yet."""
    from .._process import _registry
    from ._serve_sweep import inflight_addresses

    held = inflight_addresses()
    for rec in _registry.list_all():
        if rec.state != "running":
            continue
        for text in rec.service_addresses:
            with contextlib.suppress(TorporError):
                held.add(_address.parse(text).ip)
    return held


def _traced(pid: int) -> bool:
    """Whether ``pid`` has a tracer (CRIU seizes the tree it dumps until it kills or thaws
    it); True if it cannot be told."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("TracerPid:"):
                    return line.split()[1:2] != ["0"]
    except OSError:
        return False  # gone meanwhile: not held by anyone
    return True


def _me() -> ProcRef:
    st = stat_fields(os.getpid())
    assert st is not None  # this very process
    return ProcRef(os.getpid(), int(st[19]))


def _boot_id() -> str:
    with open(_BOOT_ID, encoding="ascii") as fh:
        return fh.read().strip()


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _drop_temp(path: Path) -> None:
    """A temporary file of :func:`record` left by a writer killed before its rename."""
    with contextlib.suppress(OSError):
        if time.time() - os.lstat(path).st_mtime > TEMP_GRACE:
            os.unlink(path)
