"""What every mode's source does alike (:mod:`._copy`, :mod:`._lazy`, :mod:`._viapool`): the
errors that say where the process runs, the service addresses and connections that move with
it, the pre-flight exchange, the image sent as ``D`` frames with its hashes (whole files, or
plans against a base the target holds), and the figures read from the target's answers."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._engine import DUMP_LOG
from .._errors import TorporError
from .._process import _registry
from .._safe import kind_problem, lstat_entries, open_dir, open_regular
from . import _address, _dedup
from ._channel import Conn
from ._wire import Progress, send_file

if TYPE_CHECKING:
    from . import _dedup_source

MAX_FILES = 4096  # files in one image; CRIU writes a dozen or so per process
PAGES_PREFIX = "pages-"  # CRIU's memory pages files: written once by the dump, never read by it


class MigrationError(TorporError):
    """A migration failed; the message says where the process runs."""


class MigrationRefusedError(MigrationError):
    """The target refused the migration in pre-flight: nothing was frozen."""


def reply_number(value: object) -> float:
    """A figure from the target's reply (``restore_ms``…), 0.0 unless a finite number >= 0:
    read after the commit (the original is gone), it must never raise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    with contextlib.suppress(OverflowError):  # an int too big for a float
        if math.isfinite(number := float(value)) and number >= 0:
            return number
    return 0.0


def addresses_to_move(
    name: str, rec: _registry.ManagedProcess, addresses: Sequence[str]
) -> tuple[tuple[_address.IPAddr, ...], list[_address.Connection]]:
    """The service addresses that move with ``rec``'s process (its own and ``addresses``) and
    the tree's TCP connections; :class:`MigrationError` (nothing frozen) if a connection is on
    an address that stays here: it could not survive the move."""
    moving = _address.parse_all([*rec.service_addresses, *addresses])
    conns = _address.connections(rec.pid)
    stuck = _address.unmoved(conns, moving)
    if stuck:
        raise MigrationError(
            f"{name} holds TCP connections on addresses that stay here ({stuck[0]}"
            f"{f' and {len(stuck) - 1} more' if len(stuck) > 1 else ''}): they cannot survive "
            f"the move (nothing was frozen; the process runs here, pid {rec.pid})",
            hint="serve them on a service address (torpor run --service-address, or "
            "torpor migrate --address ADDR/PREFIX), or close them first",
        )
    return moving, conns


def preflight(
    conn: Conn, first: dict[str, Any], *, name: str, where: str, pid: int
) -> dict[str, Any]:
    """Send the pre-flight message ``first`` and take the target's answer: ``ready`` (returned),
    or :class:`MigrationRefusedError` naming its problems, or :class:`MigrationError` for
    anything else (nothing was frozen either way)."""
    conn.send(first)
    reply = conn.recv()
    if reply.get("type") == "refused":
        found = [str(p) for p in reply.get("problems", [])] or ["no reason given"]
        raise MigrationRefusedError(
            f"migration of {name} to {where} refused in pre-flight: {'; '.join(found)} "
            f"(nothing was frozen; the process runs here, pid {pid})",
            hint="fix what the target reports, then migrate again",
        )
    if reply.get("type") != "ready":
        raise MigrationError(f"{where} answered pre-flight with {reply.get('type')!r}")
    return reply


@dataclass(frozen=True)
class Sent:
    """An image sent: its bytes and files, and how its bytes crossed."""

    bytes: int
    files: int
    counts: _dedup.Counts


def transfer_image(
    conn: Conn,
    staging: Path,
    image_facts: dict[str, Any],
    *,
    say: Callable[[str], None] | None,
    where: str,
    base: _dedup_source.SourceBase | None = None,
    consume: bool = False,
    streamed: Mapping[str, int] | None = None,
) -> Sent:
    """Send the dump in ``staging`` (every file but CRIU's log; regular files only) as an
    ``image`` message with ``image_facts``, the files' bytes as ``D`` frames and their
    SHA-256 in a ``hashes`` message; against ``base`` if the target holds one (the ``image``
    message then names it, and each file goes as plans: :mod:`._dedup`).

    With ``consume`` each memory pages file (``pages-*.img``, the bulk of the image) is
    removed here as soon as it is sent: CRIU does not read it again, and the memory its
    copy in a tmpfs holds is free for the rest of the move (on a host that is short of
    memory, or whose freed memory the machine hands on, that is the target's restore)."""
    dir_fd = open_dir(staging)
    counts = _dedup.Counts()
    try:
        entries = lstat_entries(dir_fd)
        names = sorted(n for n in entries if n != DUMP_LOG)
        for n in names:
            kind = kind_problem(entries[n].st_mode)
            if kind is not None:
                raise MigrationError(f"the dump holds {n}, {kind}, not a regular file")
        if len(names) > MAX_FILES:
            raise MigrationError(f"the dump has {len(names)} files, over {MAX_FILES}")
        files = [{"name": n, "size": entries[n].st_size} for n in names]
        image: dict[str, Any] = {"type": "image", "facts": image_facts, "files": files}
        if base is not None:
            image["base"] = base.id
        conn.send(image)
        hashes: dict[str, str] = {}
        there = sum((streamed or {}).values())
        total = sum(entries[n].st_size for n in names) + there
        progress = Progress(say, total, where)
        if there:
            progress(there)
        for n in names:
            fd = open_regular(dir_fd, n, source=str(staging))
            size = entries[n].st_size
            try:
                if base is None:
                    hashes[n] = send_file(conn, fd, size, progress=progress)
                    counts.sent += size
                else:
                    from . import _dedup_source

                    hashes[n], got = _dedup_source.send_file(
                        conn, fd, n, size, base, progress=progress
                    )
                    counts.add(got)
            finally:
                os.close(fd)
            if consume and n.startswith(PAGES_PREFIX):
                os.unlink(n, dir_fd=dir_fd)
        conn.send({"type": "hashes", "files": hashes})
    finally:
        os.close(dir_fd)
    counts.sent += there
    return Sent(total, len(names) + len(streamed or {}), counts)
