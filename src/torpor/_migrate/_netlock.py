"""nftables network locking around a migration that keeps TCP connections (issue 9, point 4).

What CRIU 4.2 does itself (``criu/net.c``, ``criu/netfilter.c``, ``criu/cr-dump.c``), for a
tree in the host's network namespace dumped with ``network_lock=NFTABLES``:

- the dump creates the table ``inet CRIU-<run id>`` (``nftables_init_connection_lock``: input
  and output chains dropping the tree's connections, listed in the sets ``conns4``/``conns6``,
  except CRIU's own packets marked ``0xC114``) and adds each established connection to it;
- when the dump fails, or its ``post-dump`` is answered ``false`` (the tree resumes), CRIU
  deletes that table (``network_unlock``);
- when the dump succeeds and the tree is killed, **the table stays**: the connections stay
  dropped on the source, so that its kernel, whose sockets are gone, answers the peers'
  packets with nothing rather than an RST. Removing it is the caller's job, once the address
  has left the source (:func:`new_criu_tables` finds it; :func:`drop` deletes it);
- a restore in the host's namespace locks nothing: it only deletes a table of the dump's run
  id if one exists (so a restore on the dump's host unlocks it).

So the target needs a lock of its own: from the moment the service address is up there
(another host may now answer ARP for it) until CRIU has the connections back, a peer's
retransmission would meet no socket and be answered with an RST, which kills the connection.
:func:`block` makes a torpor table ``inet torpor-mig-<tag>`` dropping everything to and from
the service addresses (but CRIU's marked packets); :func:`drop` removes it once the restore
is done, or on any failure; the next server of the same home removes what a killed one left
(:func:`lock_table`: the table its journal names, if it bears its mark).

**A lock never takes over a table that exists.** The peer may name the lock (after its dump's
CRIU table), so the name may be that of a table here, another dump's. :func:`block` makes the
table with ``create table`` in the same ``nft -f`` transaction as its chains: ``create`` fails
where ``add`` would merge, and a failed transaction changes nothing, so the check and the
creation are one step (:class:`LockTakenError`; no window between a listing and an ``add``).
The table is marked with the comment ``torpor-mig-<tag>``, and the sweep of a killed server
deletes a lock its journal names only if it bears the journal's mark
(:func:`made_by_block`): a server killed between writing its journal and a refused creation
leaves a journal naming another's table, which must stay.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

from .._errors import TorporError
from ._address import IPAddr

TABLE_PREFIX = "torpor-mig-"
_CRIU_PREFIX = "CRIU-"
_SOCCR_MARK = 0xC114  # CRIU's own TCP-repair packets (soccr/soccr.h): let through
_ND = "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,60}\Z")
_CRIU_NAME = re.compile(r"CRIU-[A-Za-z0-9-]{1,21}\Z")
_NFT_TIMEOUT = 10.0


class NetlockError(TorporError):
    """nft failed."""


class LockTakenError(NetlockError):
    """The lock's table exists here already (another's): nothing was made or changed."""


_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON (nftables/libnftables.h)


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """libnftables (what ``nft`` itself runs on), or None. In the server's process each
    command costs a fraction of a millisecond instead of an ``nft`` start (several under
    load), which counts: the target's lock and unlock fall in the migration's downtime."""
    try:
        lib = ctypes.CDLL("libnftables.so.1")
    except OSError:
        return None
    vp = ctypes.c_void_p
    lib.nft_ctx_new.restype, lib.nft_ctx_new.argtypes = vp, [ctypes.c_uint32]
    for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error", "nft_ctx_free"):
        getattr(lib, fn).argtypes = [vp]
    lib.nft_ctx_output_set_flags.argtypes = [vp, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.argtypes = [vp, ctypes.c_char_p]
    for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(lib, fn).argtypes = [vp]
        getattr(lib, fn).restype = ctypes.c_char_p
    return lib


def _nft(*args: str, stdin: str | None = None) -> str:
    """``nft ARGS`` (``-f -`` reads ``stdin``; ``-j`` asks for JSON): its output."""
    lib = _lib()
    if lib is not None:
        return _nft_lib(lib, args, stdin)
    try:
        res = subprocess.run(
            ["nft", *args], input=stdin, capture_output=True, text=True,
            timeout=_NFT_TIMEOUT, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise NetlockError(
            f"nft could not run: {exc}", hint="install nftables (scripts/install-criu.sh)"
        ) from exc
    if res.returncode != 0:
        raise NetlockError(f"nft {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout


def _nft_lib(lib: ctypes.CDLL, args: tuple[str, ...], stdin: str | None) -> str:
    words = [a for a in args if a != "-j"]
    command = stdin or "" if words == ["-f", "-"] else " ".join(words)
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise NetlockError("libnftables could not make a context")
    try:
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        if "-j" in args:
            lib.nft_ctx_output_set_flags(ctx, _OUTPUT_JSON)
        rc = lib.nft_run_cmd_from_buffer(ctx, command.encode())
        out = lib.nft_ctx_get_output_buffer(ctx) or b""
        err = lib.nft_ctx_get_error_buffer(ctx) or b""
    finally:
        lib.nft_ctx_free(ctx)
    if rc != 0:
        first = err.decode(errors="replace").strip().splitlines()[:1] or ["no reason given"]
        raise NetlockError(f"nft {' '.join(args)} failed: {first[0]}")
    return str(out.decode(errors="replace"))


def tables() -> set[tuple[str, str]]:
    """Every nftables table of this host (network namespace): ``(family, name)``."""
    try:
        data = json.loads(_nft("-j", "list", "tables"))
    except ValueError as exc:
        raise NetlockError("nft -j list tables printed no JSON") from exc
    out = set()
    for item in data.get("nftables", []) if isinstance(data, dict) else []:
        table = item.get("table") if isinstance(item, dict) else None
        if isinstance(table, dict):
            out.add((str(table.get("family")), str(table.get("name"))))
    return out


def new_criu_tables(before: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """CRIU's lock tables that exist now and did not in ``before`` (any dump's: see
    :func:`dump_table` for the one of a given dump)."""
    return {t for t in tables() - before if t[1].startswith(_CRIU_PREFIX)}


_INVENTORY = "inventory.img"
_INVENTORY_MAGIC = 0x58313116  # criu/include/magic.h
_INVENTORY_MAX = 1 << 16
_RUN_ID_FIELD = 13  # inventory_entry.dump_criu_run_id (images/inventory.proto)
_RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_RUN_ID_KEEP = 21  # "inet CRIU-" and 21 characters fill CRIU's char table[32]


def dump_table(image_dir: int) -> tuple[str, str] | None:
    """The lock table of the dump whose image is in the directory fd ``image_dir``: ``inet
    CRIU-<run id>``, named from the run id CRIU 4.2 writes into the dump's ``inventory.img``
    before its ``post-dump`` (``dump_criu_run_id``; ``nftables_get_table`` in
    ``criu/netfilter.c`` cuts it to fit a 32-byte buffer). None if the image has none (no
    inventory yet, or one without the field). Unlike :func:`new_criu_tables` it cannot name
    the table of another dump made meanwhile on this host. The file is read as hostile input
    (regular, not followed, bounded); a malformed one raises :class:`NetlockError`."""
    from .._errors import ImageError
    from .._safe import read_regular

    try:
        data = read_regular(image_dir, _INVENTORY, source="the dump", limit=_INVENTORY_MAX)
    except FileNotFoundError:
        return None
    except (OSError, ImageError) as exc:
        raise NetlockError(f"cannot read the dump's {_INVENTORY}: {exc}") from exc
    if len(data) < 8 or int.from_bytes(data[:4], "little") != _INVENTORY_MAGIC:
        raise NetlockError(f"the dump's {_INVENTORY} is not CRIU's inventory")
    size = int.from_bytes(data[4:8], "little")
    if size > len(data) - 8:
        raise NetlockError(f"the dump's {_INVENTORY} is cut short")
    run_id = _string_field(data[8 : 8 + size], _RUN_ID_FIELD)
    if run_id is None:
        return None
    if not _RUN_ID.match(run_id):
        raise NetlockError(f"the dump's {_INVENTORY} holds no CRIU run id it could have made")
    return ("inet", _CRIU_PREFIX + run_id[:_RUN_ID_KEEP])


def own_tables(
    image: Path, before: set[tuple[str, str]]
) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """The lock table of the dump whose image is being written at ``image`` (at its
    ``post-dump``, inside the freeze), and a warning if none could be named: the table
    :func:`dump_table` names (no ``nft`` run: a listing costs ~40 ms of the freeze); without a
    run id there (another CRIU), the one CRIU table new since ``before``, if there is exactly
    one; with several, none (another dump's lock must not be deleted; ours may then be left,
    which the warning says)."""
    from .._safe import open_dir

    fd = open_dir(image)
    try:
        own = dump_table(fd)
    finally:
        os.close(fd)
    if own is not None:
        return (own,), None
    new = new_criu_tables(before)
    if len(new) == 1:
        return tuple(new), None
    if not new:
        return (), None
    names = ", ".join(sorted(n for _, n in new))
    return (), (
        f"warning: the dump names no lock table and several CRIU tables are new here ({names}): "
        "none is removed"
    )


def _string_field(msg: bytes, field: int) -> str | None:
    """The last value of the length-delimited ``field`` in the protobuf message ``msg`` (its
    wire form walked as is: CRIU's inventory has no other use here), or None."""
    found: str | None = None
    pos = 0
    while pos < len(msg):
        key, pos = _varint(msg, pos)
        kind = key & 7
        if kind == 0:
            _, pos = _varint(msg, pos)
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == 2:
            n, pos = _varint(msg, pos)
            if pos + n > len(msg):
                raise NetlockError(f"the dump's {_INVENTORY} is cut short")
            if key >> 3 == field:
                try:
                    found = msg[pos : pos + n].decode("ascii")
                except UnicodeDecodeError as exc:
                    raise NetlockError(f"the dump's {_INVENTORY} has a bad run id") from exc
            pos += n
        else:
            raise NetlockError(f"the dump's {_INVENTORY} is not a protobuf message")
        if pos > len(msg):
            raise NetlockError(f"the dump's {_INVENTORY} is cut short")
    return found


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):
        if pos >= len(data):
            break
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    raise NetlockError(f"the dump's {_INVENTORY} is not a protobuf message")


def criu_name(text: object) -> str | None:
    """``text`` if it is a name CRIU gives its lock table (``CRIU-<run id>``, cut to 26
    characters by CRIU's buffer), else None. It comes from the peer: checked here."""
    return text if isinstance(text, str) and _CRIU_NAME.match(text) else None


def block(tag: str, addresses: Iterable[IPAddr], *, criu: str | None = None) -> tuple[str, str]:
    """Drop all traffic to and from ``addresses`` here (CRIU's repair packets excepted), in a
    table of its own named by ``tag``; the table, for :func:`drop`.

    With ``criu`` (the name of the dump's lock table on the source, :func:`criu_name`), the
    table is named so instead: a restore deletes the table of its dump's run id at the very
    moment CRIU unlocks its own (after ``post-restore``, before the sockets leave repair mode
    and send their window probes), which is when this lock must go too. Lifted later, it
    would drop those probes and the peers' answers, and a connection whose data was in flight
    would wait for its restored socket's first retransmission (1 s)."""
    if not _NAME.match(tag):
        raise NetlockError(f"bad lock name {tag!r}")
    if criu is not None and criu_name(criu) is None:
        raise NetlockError(f"bad CRIU lock name {criu!r}")
    name = criu or f"{TABLE_PREFIX}{tag}"
    rules_in, rules_out = [], []
    for a in addresses:
        fam = "ip" if a.version == 4 else "ip6"
        rules_in.append(f"    {fam} daddr {a.ip} drop")
        rules_out.append(f"    {fam} saddr {a.ip} drop")
    if not rules_in:
        raise NetlockError("no address to lock")
    # Neighbour discovery passes (ARP is not seen here at all): the announcement of the
    # addresses, and the answers to the peers' solicitations, must reach them while locked.
    mark = f"    meta mark {_SOCCR_MARK:#x} accept\n{_ND}"
    script = "\n".join(
        [
            # Fails (and with it the whole transaction) if the table exists: never merged.
            f'create table inet {name} {{ comment "{_mark(tag)}"; }}',
            f"table inet {name} {{",
            "  chain input {",
            "    type filter hook input priority -10; policy accept;",
            mark,
            *rules_in,
            "  }",
            "  chain output {",
            "    type filter hook output priority -10; policy accept;",
            mark,
            *rules_out,
            "  }",
            "}",
            "",
        ]
    )
    try:
        _nft("-f", "-", stdin=script)
    except NetlockError as exc:
        # Whatever nft said (its words depend on its version and locale): a transaction
        # that failed made nothing, so a table of that name now is not ours.
        if ("inet", name) in tables():
            raise LockTakenError(
                f"a table inet {name} exists here already: the lock was not made (nothing changed)"
            ) from exc
        raise
    return ("inet", name)


def _mark(tag: str) -> str:
    return f"{TABLE_PREFIX}{tag}"


def made_by_block(table: tuple[str, str], tag: object) -> bool | None:
    """Whether ``table`` is the lock :func:`block` made with ``tag`` (it bears its mark);
    None if there is no such table. ``tag`` may come from a journal: anything not a tag
    :func:`block` takes is no mark."""
    family, name = table
    if family not in ("inet", "ip", "ip6") or not _NAME.match(name):
        raise NetlockError(f"bad table {family} {name!r}")
    if table not in tables():
        return None
    if not isinstance(tag, str) or not _NAME.match(tag):
        return False
    # The text listing: nft 1.0.6's JSON leaves table comments out.
    listing = _nft("list", "table", family, name)
    return f'comment "{_mark(tag)}"' in (line.strip() for line in listing.splitlines())


def drop(table: tuple[str, str], *, known: bool = False) -> bool:
    """Delete ``table`` if it exists (``known``: it does, no need to look); whether it did."""
    family, name = table
    if family not in ("inet", "ip", "ip6") or not _NAME.match(name):
        raise NetlockError(f"bad table {family} {name!r}")
    if not known and table not in tables():
        return False
    _nft("delete", "table", family, name)
    return True


def lock_table(lock: object, tag: object) -> tuple[str, str] | None:
    """The table a lock of :func:`block` made with ``tag`` (and ``criu``: ``lock``) has, as a
    server's journal names them (read as hostile: anything :func:`block` would refuse names
    no table); None if they name none. What a killed server's sweep may delete, and only
    once :func:`made_by_block` has found the tag's mark on it: never every ``torpor-mig-*``
    table of the host, since the servers of other homes make theirs here too."""
    if lock is not None:
        name = criu_name(lock)
        return None if name is None else ("inet", name)
    if isinstance(tag, str) and _NAME.match(tag) and len(TABLE_PREFIX) + len(tag) <= 60:
        return ("inet", _mark(tag))
    return None
