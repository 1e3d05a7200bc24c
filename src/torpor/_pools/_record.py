"""Pool manifests: what a pool stores for one image, and the chunk lists they point to.

A pool manifest (key ``images/<name>``) is zstd-compressed JSON::

    {"format": 1, "name": ..., "pushed": ..., "stored_bytes": ...,
     "manifest": {the image's torpor.json},
     "signature": {"manifest": "<signed torpor.json>", "key": ..., "sig": ...},  # _sign.py
     "files": [{"name", "size", "sha256", "chunk_size",
                 "digests": "<hex>"                              # short lists, inline
                 | "list": "<id>", "list_sha256": "<hex>", "patch": "<base64>"}],
     "where": {"packs": ["<pack id>", ...], "runs": "<base64>"}}   # optional, see below

A long chunk list lives in a *list object* (key ``lists/<id>``, zstd of the digests back to
back, ``id`` random like a pack id, its SHA-256 in the manifest) and the manifest adds a patch
against it (:func:`~torpor._pools._cas.apply_patch`). Many manifests share one list object;
the manifest is the only thing naming an image, and it is written last.

``where`` (written since issue 10; a manifest without it is read as before) says which pack
held each chunk when the manifest was written: ``runs`` is ``"<II"`` pairs (a number into
``packs``, or :data:`NO_PACK` for a chunk stored nowhere, the zero page; how many chunks in a
row) over the chunks of every file, in file order. A lazy restore then reads the indexes of
those packs only, not every index of the pool (:mod:`._located`). It is a hint from outside:
:class:`Locations` bounds and checks its shape here; a chunk it puts in a pack that does not
hold it is refused where it is looked up, and every chunk is still checked against its
SHA-256 before use. Garbage collection may repack chunks elsewhere: a pack it names that is
gone (or condemned) makes the reader fall back to every index.

Everything in a pool manifest comes from outside (a shared pool, an archive): :meth:`Record.decode`
refuses, before anything is fetched or written, a file name that is not a plain name
(:func:`torpor._safe.check_name`) or is one of torpor's own names, duplicate files, files that
differ from the ones the manifest lists, an image name or id or list id of the wrong form,
and a signed manifest that does not cover the stored one.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import json
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import zstandard

from .. import _safe
from .._errors import (
    ImageCorruptedError,
    ImageError,
    TorporError,
    UnsafeImageError,
    UsageError,
)
from .._images._layout import is_bookkeeping
from .._images._manifest import FileEntry, Manifest
from .._images._store import check_name as check_image_name
from . import _cas
from ._sign import Origin, covers

RECORD_FORMAT = 1
IMAGES_PREFIX = "images/"
LISTS_PREFIX = "lists/"
# Ids torpor makes (image ids, list and pack ids) are 128 random bits in hex: an id from
# outside of any other form is refused before it names a key or a cache file.
ID_RE = re.compile(r"[0-9a-f]{32}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
# Bounds on what a manifest from outside may make us allocate. They are the pool format's
# too: a writer stores nothing a reader would refuse (:func:`file_problem`,
# :func:`record_problem`, :meth:`Locations.within`, checked by :mod:`._write`).
MAX_RECORD = 64 << 20
MAX_LIST = 1 << 30
MAX_FILE_SIZE = 1 << 44
# The only chunk sizes torpor writes (:func:`~._cas.chunk_size_for`): a record naming another
# (``chunk_size=1``: a chunk count, and so a list bound, of its file's size) is refused.
CHUNK_SIZES = frozenset((_cas.PAGE_SIZE, _cas.LARGE_CHUNK))
# ``where``: at most this many packs (a pack holds ~1000 chunks: 4 TiB of distinct pages).
MAX_WHERE_PACKS = 1 << 20
NO_PACK = 0xFFFFFFFF
_RUN = struct.Struct("<II")


def is_id(value: object) -> bool:
    """Whether ``value`` has the form of an id torpor makes (32 lowercase hex digits)."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def human(n: int) -> str:
    """``1536`` → ``1.5 KiB`` (binary units, as the bounds are)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def list_bytes(count: int) -> int:
    """The decoded size of a chunk list of ``count`` chunks: what :data:`MAX_LIST` bounds."""
    return count * _cas.DIGEST_SIZE


def file_problem(size: int, chunk_size: int) -> str | None:
    """Why a reader would refuse a file of ``size`` bytes in chunks of ``chunk_size`` (over
    :data:`MAX_FILE_SIZE`, or its chunk list over :data:`MAX_LIST`: the bounds of
    :meth:`FileRecord.from_dict` and :func:`decode_list_object`), in words; None if it would
    not. A writer refuses such a file before it stores anything."""
    if size > MAX_FILE_SIZE:
        return f"is over the pool format's {human(MAX_FILE_SIZE)} for a file"
    need = list_bytes(_cas.chunk_count(size, chunk_size))
    if need > MAX_LIST:
        return f"needs a chunk list of {human(need)}, over the pool format's {human(MAX_LIST)}"
    return None


def _record_json(blob: bytes) -> bytes:
    """The JSON of a stored pool manifest, at most :data:`MAX_RECORD` bytes (``ValueError``
    beyond): what every reader decodes, and every writer checks (:func:`record_problem`)."""
    return _cas.bounded_decompress(blob, MAX_RECORD)


def record_problem(blob: bytes) -> str | None:
    """Why a reader would refuse the stored pool manifest ``blob`` for its size (over
    :data:`MAX_RECORD` as stored, or decoded), in words; None if it would not."""
    if len(blob) > MAX_RECORD:
        return (
            f"its pool manifest would be {human(len(blob))}, over the pool format's "
            f"{human(MAX_RECORD)}"
        )
    try:
        _record_json(blob)
    except ValueError:
        return f"its pool manifest would decode to over the pool format's {human(MAX_RECORD)}"
    return None


def _reserved(name: str) -> str | None:
    """Why ``name`` cannot be a content file of an image (torpor's own files, logs, hidden
    files: an image directory never lists them as content), or None."""
    if is_bookkeeping(name) or name.startswith(("torpor.", ".")):
        return "is one of torpor's own file names"
    if name.endswith(".log"):
        return "is a log file name"
    return None


def image_key(name: str) -> str:
    """The backend key of an image's pool manifest."""
    return IMAGES_PREFIX + name


def list_key(list_id: str) -> str:
    """The backend key of a list object."""
    return LISTS_PREFIX + list_id


@dataclass(frozen=True)
class FileRecord:
    """One file of a pooled image and how to find its chunk list."""

    name: str
    size: int
    sha256: str
    chunk_size: int
    inline: bytes | None = None
    list_id: str | None = None
    list_sha256: str | None = None
    patch: bytes = b""

    @property
    def count(self) -> int:
        """How many chunks the file has."""
        return _cas.chunk_count(self.size, self.chunk_size)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        out: dict[str, Any] = {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "chunk_size": self.chunk_size,
        }
        if self.inline is not None:
            out["digests"] = self.inline.hex()
        else:
            out["list"] = self.list_id
            out["list_sha256"] = self.list_sha256
            out["patch"] = base64.b64encode(self.patch).decode("ascii")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str) -> FileRecord:
        """Parse the JSON form: :class:`UnsafeImageError` for a file name that is not a plain
        name; ``KeyError``/``ValueError``/``TypeError`` for anything else malformed."""
        if not isinstance(data, dict):
            raise TypeError("a file entry is not an object")
        name = _safe.check_name(data["name"], source=source)
        problem = _reserved(name)
        if problem is not None:
            raise UnsafeImageError(
                f"{source}: file name {name!r} {problem}; refused",
                image=source,
                file=name,
                hint="the image was made or changed by something other than torpor: do not use it",
            )
        size, chunk_size, sha256 = data["size"], data["chunk_size"], data["sha256"]
        if type(size) is not int or not 0 <= size <= MAX_FILE_SIZE:
            raise ValueError(f"file {name}: size {size!r} is out of range")
        if type(chunk_size) is not int or chunk_size not in CHUNK_SIZES:
            raise ValueError(
                f"file {name}: chunk size {chunk_size!r} is out of range (torpor writes "
                f"{_cas.PAGE_SIZE} or {_cas.LARGE_CHUNK})"
            )
        if not isinstance(sha256, str) or not _SHA_RE.fullmatch(sha256):
            raise ValueError(f"file {name}: {sha256!r} is not a SHA-256")
        common = (name, size, sha256, chunk_size)
        if "digests" in data:
            if not isinstance(data["digests"], str):
                raise TypeError(f"file {name}: digests are not a string")
            return cls(*common, inline=bytes.fromhex(data["digests"]))
        list_id, list_sha256, patch = data["list"], data["list_sha256"], data["patch"]
        if not is_id(list_id):
            raise ValueError(f"file {name}: list id {list_id!r} is not an id torpor makes")
        if not isinstance(list_sha256, str) or not _SHA_RE.fullmatch(list_sha256):
            raise ValueError(f"file {name}: {list_sha256!r} is not a SHA-256")
        if not isinstance(patch, str):
            raise TypeError(f"file {name}: patch is not a string")
        return cls(
            *common,
            list_id=list_id,
            list_sha256=list_sha256,
            patch=base64.b64decode(patch, validate=True),
        )

    @property
    def entry(self) -> FileEntry:
        """The manifest's entry for this file."""
        return FileEntry(self.name, self.size, self.sha256)


@dataclass(frozen=True)
class Locations:
    """The record's ``where`` (see the module docstring): the pack of chunk ``n`` of the
    image's chunks in file order. Checked whole by :meth:`from_dict`."""

    packs: tuple[str, ...]
    runs: bytes

    @classmethod
    def build(cls, pack_of: Sequence[str | None]) -> Locations:
        """From the pack (or None) of each chunk, in order."""
        numbers: dict[str, int] = {}
        out = bytearray()
        prev, count = -1, 0
        for p in pack_of:
            n = NO_PACK if p is None else numbers.setdefault(p, len(numbers))
            if n == prev:
                count += 1
                continue
            if count:
                out += _RUN.pack(prev, count)
            prev, count = n, 1
        if count:
            out += _RUN.pack(prev, count)
        return cls(tuple(numbers), bytes(out))

    @staticmethod
    def within(packs: int) -> bool:
        """Whether a reader takes a ``where`` of this many packs (at most
        :data:`MAX_WHERE_PACKS`); a writer leaves out one it would not (it is a hint)."""
        return packs <= MAX_WHERE_PACKS

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"packs": list(self.packs), "runs": base64.b64encode(self.runs).decode("ascii")}

    @classmethod
    def from_dict(cls, data: object, *, chunks: int) -> Locations:
        """Parse and check the JSON form against the record's ``chunks`` (how many its files
        have): ``ValueError``/``TypeError``/``KeyError`` if anything is off."""
        if not isinstance(data, dict) or set(data) != {"packs", "runs"}:
            raise TypeError("where is not an object of packs and runs")
        packs, runs = data["packs"], data["runs"]
        if not isinstance(packs, list) or not cls.within(len(packs)):
            raise ValueError(f"where: packs is not a list of at most {MAX_WHERE_PACKS}")
        if not all(is_id(p) for p in packs) or len(set(packs)) != len(packs):
            raise ValueError("where: packs are not distinct pack ids")
        # At most one run per chunk: base64 of 8 bytes a chunk.
        if not isinstance(runs, str) or len(runs) > 4 * -(-_RUN.size * chunks // 3):
            raise ValueError("where: runs is not a string, or longer than the record's chunks")
        try:
            raw = base64.b64decode(runs, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"where: runs is not base64 ({exc})") from exc
        if len(raw) % _RUN.size:
            raise ValueError("where: runs is not whole entries")
        total = 0
        for n, count in _RUN.iter_unpack(raw):
            if count == 0 or (n >= len(packs) and n != NO_PACK):
                raise ValueError(f"where: run ({n}, {count}) is not a pack of the list")
            total += count
        if total != chunks:
            raise ValueError(f"where: runs cover {total} chunks, the files have {chunks}")
        return cls(tuple(packs), raw)

    def finder(self, files: Sequence[FileRecord]) -> Callable[[str, int], str | None]:
        """``find(file, i)``: the pack of chunk ``i`` of ``files``' file ``file``, or None."""
        base: dict[str, int] = {}
        pos = 0
        for f in files:
            base[f.name] = pos
            pos += f.count
        starts: list[int] = []
        numbers: list[int] = []
        pos = 0
        for n, count in _RUN.iter_unpack(self.runs):
            starts.append(pos)
            numbers.append(n)
            pos += count
        packs = self.packs

        def find(file: str, i: int) -> str | None:
            n = numbers[bisect.bisect_right(starts, base[file] + i) - 1]
            return None if n == NO_PACK else packs[n]

        return find


@dataclass(frozen=True)
class Record:
    """A decoded pool manifest."""

    name: str
    manifest: Manifest
    pushed: str
    stored_bytes: int
    files: tuple[FileRecord, ...]
    origin: Origin | None = None
    where: Locations | None = None

    @property
    def size(self) -> int:
        """The image's size (sum of its files)."""
        return sum(f.size for f in self.files)

    @property
    def held(self) -> int:
        """About how many bytes the decoded record holds beyond its fixed fields (its inline
        digests, patches and ``where``): what a listing of many records keeps."""
        files = sum(len(f.inline or b"") + len(f.patch) + 256 for f in self.files)
        where = len(self.where.runs) + 64 * len(self.where.packs) if self.where else 0
        return files + where

    @property
    def list_ids(self) -> set[str]:
        """The list objects this manifest needs."""
        return {f.list_id for f in self.files if f.list_id is not None}

    def encode(self) -> bytes:
        """The stored form (zstd of JSON)."""
        data = {
            "format": RECORD_FORMAT,
            "name": self.name,
            "pushed": self.pushed,
            "stored_bytes": self.stored_bytes,
            "manifest": json.loads(self.manifest.to_json()),
            "files": [f.to_dict() for f in self.files],
        }
        if self.origin is not None:
            data["signature"] = self.origin.to_dict()
        if self.where is not None:
            data["where"] = self.where.to_dict()
        raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return zstandard.ZstdCompressor(level=9).compress(raw)

    @classmethod
    def decode(cls, name: str, blob: bytes, *, pool: str) -> Record:
        """Parse a stored pool manifest: :class:`UnsafeImageError` for a name or file that
        must not be used (see the module docstring), :class:`ImageCorruptedError` if it is
        damaged in any other way."""
        source = f"image {name!r} in pool {pool!r}"
        try:
            check_image_name(name)
            data = json.loads(_record_json(blob))
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            if type(data["format"]) is not int or data["format"] > RECORD_FORMAT:
                raise ValueError(f"format {data['format']!r} is newer than this torpor")
            if data["name"] != name:
                raise ValueError(f"it names itself {data['name']!r}")
            manifest = Manifest.from_json(json.dumps(data["manifest"]), source=source)
            if not isinstance(data["files"], list):
                raise TypeError("files is not a list")
            files = tuple(FileRecord.from_dict(f, source=source) for f in data["files"])
            origin = Origin.from_dict(data["signature"]) if "signature" in data else None
            rec = cls(
                name=name,
                manifest=manifest,
                pushed=str(data["pushed"]),
                stored_bytes=int(data["stored_bytes"]),
                files=files,
                origin=origin,
            )
            rec.check(source=source)
            if "where" in data:  # after the files are known sound: it is checked against them
                chunks = sum(f.count for f in files)
                rec = replace(rec, where=Locations.from_dict(data["where"], chunks=chunks))
            return rec
        except UnsafeImageError:
            raise
        except (ValueError, KeyError, TypeError, RecursionError, ImageError, UsageError) as exc:
            # A torpor error's own hint ("checkpoint again") is not the fix here: only its msg.
            detail = exc.msg if isinstance(exc, TorporError) else str(exc)
            raise ImageCorruptedError(
                f"the manifest of image {name!r} in pool {pool!r} is damaged ({detail})",
                image=name,
                file="manifest",
                hint=f"delete it: torpor image delete {name}@{pool}",
            ) from exc

    def check(self, *, source: str) -> None:
        """The record's own consistency (raises as :meth:`decode` does): its files are
        plain, distinct, and exactly the manifest's; its signed manifest covers it."""
        seen: set[str] = set()
        for f in self.files:
            if f.name in seen:
                raise UnsafeImageError(
                    f"{source}: file {f.name} is listed twice; refused", image=source, file=f.name
                )
            seen.add(f.name)
        if tuple(f.entry for f in self.files) != self.manifest.files:
            raise ValueError("its files are not the ones its manifest lists")
        if self.manifest.name != self.name:
            raise ValueError(f"its manifest names the image {self.manifest.name!r}")
        if not is_id(self.manifest.id):
            raise ValueError(f"image id {self.manifest.id!r} is not an id torpor makes")
        if self.origin is not None:
            signed = self.origin.signed_manifest(source=f"{source} (signed manifest)")
            if not covers(signed, self.manifest):
                raise ValueError("its manifest is not the one that was signed")


def encode_list_object(digests: Sequence[bytes]) -> tuple[bytes, str]:
    """The stored form of a list object and the SHA-256 (hex) of its decoded content."""
    raw = _cas.encode_list(digests)
    return zstandard.ZstdCompressor(level=3).compress(raw), hashlib.sha256(raw).hexdigest()


def _compress_bound(n: int) -> int:
    """The most bytes zstd makes of ``n`` (ZSTD_compressBound, and a frame header's room)."""
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < 128 << 10 else 0) + 64


def list_limit(f: FileRecord) -> int:
    """The most bytes to read of the list object of ``f``: what zstd makes of its digests
    (the file's chunk count of them, exactly, unless a patch is applied to the list; then
    the list is another file's, of any length up to :data:`MAX_LIST` bytes). Never more
    than :data:`MAX_LIST`'s bound: the count is the record's word, and a hostile record's
    16 TiB file would otherwise let a list object of GiBs be read whole."""
    raw = MAX_LIST if f.patch else min(list_bytes(f.count), MAX_LIST)
    return _compress_bound(raw)


def decode_list_object(blob: bytes, sha256: str) -> list[bytes]:
    """Decode and verify a list object; :class:`ValueError` if it does not match."""
    return _cas.decode_list(_verified_list(blob, sha256))


def decode_list_object_lazily(blob: bytes, sha256: str) -> _cas.Digests:
    """:func:`decode_list_object` as :class:`~._cas.Digests` (cut out when used)."""
    return _cas.Digests(_verified_list(blob, sha256))


def _verified_list(blob: bytes, sha256: str) -> bytes:
    raw = _cas.bounded_decompress(blob, MAX_LIST)
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError("does not match its SHA-256")
    return raw
