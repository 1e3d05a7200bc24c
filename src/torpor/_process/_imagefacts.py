"""What restoring an image does that copies of it must know, read from CRIU's own image files
(``files.img``, ``remap-fpath.img``, ``pstree.img``, ``ids-*.img``, ``core-*.img``,
``fdinfo-*.img``), and the one rewrite copies need: :func:`with_reuseport`.

The files are outside input: each is read through :func:`torpor._safe.read_regular` (no
symlink, at most :data:`MAX_FILES_IMG` bytes), and a damaged one (bad magic, an entry past the
end, a malformed protobuf field) raises :class:`~torpor.ImageCorruptedError` naming the file.
Protobuf is read by hand (:class:`_Message`) rather than through generated classes so that a
rewritten entry keeps every byte of the fields torpor knows nothing of.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .. import _safe
from .._errors import ImageCorruptedError

# The largest of these files read (a files.img of tens of thousands of descriptors fits).
MAX_FILES_IMG = 64 << 20

# CRIU's image framing (criu/include/magic.h): two u32 magics, then entries each prefixed by
# its u32 length.
_HEADER = struct.Struct("<II")
_U32 = struct.Struct("<I")
_IMG_COMMON_MAGIC = 0x54564319
_FILES_MAGIC = 0x56303138
_REMAP_FPATH_MAGIC = 0x59133954
_PSTREE_MAGIC = 0x50273030
_IDS_MAGIC = 0x54432030
_CORE_MAGIC = 0x55053847
_FDINFO_MAGIC = 0x56213732
FILES_IMG = "files.img"
REMAP_FPATH_IMG = "remap-fpath.img"
PSTREE_IMG = "pstree.img"

# Field numbers and values of CRIU's images/*.proto that this module reads or writes.
_FE_TYPE, _FE_ID, _FE_REG, _FE_ISK, _FE_USK = 1, 2, 3, 4, 16  # file_entry
_FD_REG, _FD_INETSK, _FD_UNIXSK = 1, 4, 5  # fd_types
_REG_FLAGS, _REG_NAME, _REG_MODE = 2, 6, 10  # reg_file_entry
_PE_PID = 1  # pstree_entry.pid
_IDS_FILES = 2  # task_kobj_ids_entry.files_id
_CORE_IDS = 4  # core_entry.ids
_FDI_ID, _FDI_TYPE, _FDI_FD = 1, 3, 4  # fdinfo_entry
_ISK_PROTO, _ISK_STATE, _ISK_OPTS = 5, 6, 14  # inet_sk_entry
_SO_REUSEPORT = 17  # sk_opts_entry.so_reuseport
_USK_NAME, _USK_NAME_DIR = 11, 14  # unix_sk_entry
_RP_ORIG, _RP_REMAP, _RP_TYPE = 1, 2, 3  # remap_file_path_entry
_REMAP_GHOST = 1  # remap_type.GHOST
_OLD_GHOST_BIT = 1 << 31  # images without remap_type flag ghosts in remap_id
_IPPROTO_TCP = 6
_TCP_LISTEN = 10


# -- what an image's restore does ---------------------------------------------------------------


@dataclass(frozen=True)
class ImageFacts:
    """What restoring an image does that copies must know about (from its ``files.img`` and
    ``remap-fpath.img``)."""

    listeners: int  # listening TCP sockets
    solo_listeners: int  # of which without SO_REUSEPORT (each copy's would be a group alone)
    paths: tuple[str, ...]  # paths CRIU creates while restoring: ghost files, unix socket names


def read_facts(image_dir: Path) -> ImageFacts:
    """Read an image's :class:`ImageFacts`; a damaged file raises ImageCorruptedError."""
    source = str(image_dir)
    with _safe.opened_dir(image_dir) as dfd:
        files = _read_entries(dfd, FILES_IMG, _FILES_MAGIC, source)
        remaps = _read_entries(dfd, REMAP_FPATH_IMG, _REMAP_FPATH_MAGIC, source)
    reg_names: dict[int, str] = {}
    paths: set[str] = set()
    listeners = solo = 0
    for raw in files or ():
        entry = _Message.parse(raw, source, FILES_IMG)
        kind = entry.get_int(_FE_TYPE)
        if kind == _FD_REG and (reg := entry.get_message(_FE_REG)) is not None:
            reg_names[entry.get_int(_FE_ID)] = reg.get_text(_REG_NAME)
        elif kind == _FD_INETSK and (isk := entry.get_message(_FE_ISK)) is not None:
            if _is_listener(isk):
                listeners += 1
                opts = isk.get_message(_ISK_OPTS)
                solo += opts is None or not opts.get_int(_SO_REUSEPORT)
        elif kind == _FD_UNIXSK and (usk := entry.get_message(_FE_USK)) is not None:
            name = usk.get_bytes(_USK_NAME)
            if name and name[0] != 0:  # bound to a path (abstract names start with NUL)
                path = os.fsdecode(name.rstrip(b"\0"))
                paths.add(f"unix:{usk.get_text(_USK_NAME_DIR)}:{path}")
    for raw in remaps or ():
        remap = _Message.parse(raw, source, REMAP_FPATH_IMG)
        remap_id = remap.get_int(_RP_REMAP)
        ghost = (
            remap.get_int(_RP_TYPE) == _REMAP_GHOST
            if remap.has(_RP_TYPE)
            else bool(remap_id & _OLD_GHOST_BIT)
        )
        if ghost:
            orig = reg_names.get(remap.get_int(_RP_ORIG), f"#{remap.get_int(_RP_ORIG)}")
            # CRIU's ghost_path() (criu/files-reg.c).
            paths.add(f"ghost:{orig}.cr.{remap_id & ~_OLD_GHOST_BIT:x}.ghost")
    return ImageFacts(listeners, solo, tuple(sorted(paths)))


def stdio_keys(image_dir: Path) -> tuple[str, ...]:
    """CRIU's ``inherit_fd`` keys (the path without its leading ``/``) of the regular files
    the image's root task writes its stdout and stderr to (a ``torpor run`` log), so that
    each restored copy can be given a log of its own in their place. Empty if they are not
    regular files (``/dev/null``, a pipe, a terminal) or the image does not say; a damaged
    file raises ImageCorruptedError."""
    source = str(image_dir)
    with _safe.opened_dir(image_dir) as dfd:
        tree = _read_entries(dfd, PSTREE_IMG, _PSTREE_MAGIC, source)
        if not tree:
            return ()
        root = _Message.parse(tree[0], source, PSTREE_IMG).get_int(_PE_PID)
        files_id = _files_id(dfd, root, source)
        if files_id is None:
            return ()
        fdinfo = f"fdinfo-{files_id}.img"
        fds = _read_entries(dfd, fdinfo, _FDINFO_MAGIC, source) or []
        wanted = set()
        for raw in fds:
            fi = _Message.parse(raw, source, fdinfo)
            if fi.get_int(_FDI_FD) in (1, 2) and fi.get_int(_FDI_TYPE) == _FD_REG:
                wanted.add(fi.get_int(_FDI_ID))
        files = _read_entries(dfd, FILES_IMG, _FILES_MAGIC, source) if wanted else None
        keys = set()
        for raw in files or ():
            entry = _Message.parse(raw, source, FILES_IMG)
            reg = entry.get_message(_FE_REG)
            if entry.get_int(_FE_ID) not in wanted or reg is None:
                continue
            name = reg.get_text(_REG_NAME)
            mode = reg.get_int(_REG_MODE) if reg.has(_REG_MODE) else None
            regular = stat.S_ISREG(mode) if mode is not None else not name.startswith("/dev/")
            writes = (reg.get_int(_REG_FLAGS) & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
            if regular and writes and name.startswith("/") and len(name) > 1:
                keys.add(name[1:])
    return tuple(sorted(keys))


def _files_id(dfd: int, pid: int, source: str) -> int | None:
    """Which ``fdinfo-N.img`` holds task ``pid``'s descriptors (from ``ids-PID.img``, or its
    core file's ids in newer images)."""
    ids = _read_entries(dfd, f"ids-{pid}.img", _IDS_MAGIC, source)
    if ids:
        return _Message.parse(ids[0], source, f"ids-{pid}.img").get_int(_IDS_FILES)
    core = _read_entries(dfd, f"core-{pid}.img", _CORE_MAGIC, source)
    if not core:
        return None
    kobj = _Message.parse(core[0], source, f"core-{pid}.img").get_message(_CORE_IDS)
    return kobj.get_int(_IDS_FILES) if kobj is not None and kobj.has(_IDS_FILES) else None


def _is_listener(isk: _Message) -> bool:
    return isk.get_int(_ISK_STATE) == _TCP_LISTEN and isk.get_int(_ISK_PROTO) == _IPPROTO_TCP


def with_reuseport(data: bytes, *, source: str = "") -> tuple[bytes, int]:
    """``files.img`` content ``data`` with ``SO_REUSEPORT`` on in every listening TCP socket's
    options, and how many sockets changed. Every other byte is kept as it was. ``source``
    (the image directory) is named in errors."""
    _check_header(data, _FILES_MAGIC, source, FILES_IMG)
    out = [data[: _HEADER.size]]
    changed = 0
    for raw in _split_entries(data, source, FILES_IMG):
        entry = _Message.parse(raw, source, FILES_IMG)
        isk = entry.get_message(_FE_ISK) if entry.get_int(_FE_TYPE) == _FD_INETSK else None
        if isk is not None and _is_listener(isk):
            opts = isk.get_message(_ISK_OPTS) or _Message([], source, FILES_IMG)
            if not opts.get_int(_SO_REUSEPORT):
                opts.set_int(_SO_REUSEPORT, 1)
                isk.set_bytes(_ISK_OPTS, opts.encode())
                entry.set_bytes(_FE_ISK, isk.encode())
                raw = entry.encode()
                changed += 1
        out.append(_U32.pack(len(raw)))
        out.append(raw)
    return b"".join(out), changed


def _read_entries(dfd: int, name: str, magic: int, source: str) -> list[bytes] | None:
    try:
        data = _safe.read_regular(dfd, name, source=source, limit=MAX_FILES_IMG)
    except FileNotFoundError:
        return None
    _check_header(data, magic, source, name)
    return _split_entries(data, source, name)


def _check_header(data: bytes, magic: int, source: str, name: str) -> None:
    if len(data) < _HEADER.size or _HEADER.unpack_from(data) != (_IMG_COMMON_MAGIC, magic):
        raise corrupt(source, name, "does not start with its CRIU magic")


def _split_entries(data: bytes, source: str, name: str) -> list[bytes]:
    entries = []
    pos = _HEADER.size
    while pos < len(data):
        if pos + _U32.size > len(data):
            raise corrupt(source, name, f"is truncated at offset {pos}")
        (size,) = _U32.unpack_from(data, pos)
        end = pos + _U32.size + size
        if end > len(data):
            raise corrupt(source, name, f"is truncated: entry at offset {pos}")
        entries.append(data[pos + _U32.size : end])
        pos = end
    return entries


def corrupt(source: str, name: str, what: str) -> ImageCorruptedError:
    return ImageCorruptedError(
        f"{source}/{name} {what}" if source else f"{name} {what}",
        image=source,
        file=name,
        hint="the image is damaged; checkpoint again",
    )


class _Message:
    """A protobuf message as its fields in wire order, so that one field can be changed and the
    rest written back byte for byte (including fields this module knows nothing of). Only the
    few fields used here are interpreted; CRIU's ``.proto`` files give their numbers."""

    def __init__(self, fields: list[tuple[int, int, bytes]], source: str, name: str) -> None:
        self.fields = fields  # (field number, wire type, raw value: varint bytes or payload)
        self.source = source
        self.name = name

    @classmethod
    def parse(cls, data: bytes, source: str, name: str) -> _Message:
        fields: list[tuple[int, int, bytes]] = []
        pos = 0
        try:
            while pos < len(data):
                key, pos = _varint(data, pos)
                number, wire = key >> 3, key & 7
                if wire == 0:
                    _, end = _varint(data, pos)
                elif wire == 1:
                    end = pos + 8
                elif wire == 2:
                    size, pos = _varint(data, pos)
                    end = pos + size
                elif wire == 5:
                    end = pos + 4
                else:
                    raise ValueError(f"wire type {wire}")
                if end > len(data) or number == 0:
                    raise ValueError("field past the end")
                fields.append((number, wire, data[pos:end]))
                pos = end
        except (ValueError, IndexError) as exc:
            raise corrupt(source, name, f"has an undecodable entry ({exc})") from exc
        return cls(fields, source, name)

    def encode(self) -> bytes:
        out = bytearray()
        for number, wire, raw in self.fields:
            out += _encode_varint(number << 3 | wire)
            if wire == 2:
                out += _encode_varint(len(raw))
            out += raw
        return bytes(out)

    def _last(self, number: int, wire: int) -> bytes | None:
        # As protobuf parsers do, the last occurrence of a non-repeated field wins.
        found = None
        for n, w, raw in self.fields:
            if n == number and w == wire:
                found = raw
        return found

    def has(self, number: int) -> bool:
        return any(n == number for n, _, _ in self.fields)

    def get_int(self, number: int) -> int:
        raw = self._last(number, 0)
        return _varint(raw, 0)[0] if raw is not None else 0

    def get_bytes(self, number: int) -> bytes:
        return self._last(number, 2) or b""

    def get_text(self, number: int) -> str:
        return self.get_bytes(number).decode("utf-8", errors="surrogateescape")

    def get_message(self, number: int) -> _Message | None:
        raw = self._last(number, 2)
        return None if raw is None else _Message.parse(raw, self.source, self.name)

    def _set(self, number: int, wire: int, raw: bytes) -> None:
        # In the place of its first occurrence (field order is kept), other occurrences dropped.
        out: list[tuple[int, int, bytes]] = []
        placed = False
        for field in self.fields:
            if field[0] != number:
                out.append(field)
            elif not placed:
                out.append((number, wire, raw))
                placed = True
        if not placed:
            out.append((number, wire, raw))
        self.fields = out

    def set_int(self, number: int, value: int) -> None:
        self._set(number, 0, _encode_varint(value))

    def set_bytes(self, number: int, value: bytes) -> None:
        self._set(number, 2, value)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
