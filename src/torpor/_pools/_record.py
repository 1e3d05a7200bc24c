"""Pool manifests: what a pool stores for one image, and the chunk lists they point to.

A pool manifest (key ``images/<name>``) is zstd-compressed JSON::

    {"format": 1, "name": ..., "pushed": ..., "stored_bytes": ...,
     "manifest": {the image's torpor.json},
     "signature": {"manifest": "<signed torpor.json>", "key": ..., "sig": ...},  # _sign.py
     "files": [{"name", "size", "sha256", "chunk_size",
                 "digests": "<hex>"                              # short lists, inline
                 | "list": "<id>", "list_sha256": "<hex>", "patch": "<base64>"}]}

A long chunk list lives in a *list object* (key ``lists/<id>``, zstd of the digests back to
back, ``id`` random like a pack id, its SHA-256 in the manifest) and the manifest adds a patch
against it (:func:`~torpor._pools._cas.apply_patch`). Many manifests share one list object;
the manifest is the only thing naming an image, and it is written last.

Everything in a pool manifest comes from outside (a shared pool, an archive): :meth:`Record.decode`
refuses, before anything is fetched or written, a file name that is not a plain name
(:func:`torpor._safe.check_name`) or is one of torpor's own names, duplicate files, files that
differ from the ones the manifest lists, an image name or id or list id of the wrong form,
and a signed manifest that does not cover the stored one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
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
# Bounds on what a manifest from outside may make us allocate.
MAX_RECORD = 64 << 20
MAX_LIST = 1 << 30
MAX_FILE_SIZE = 1 << 44
MAX_CHUNK_SIZE = 64 << 20


def is_id(value: object) -> bool:
    """Whether ``value`` has the form of an id torpor makes (32 lowercase hex digits)."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


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
        if type(chunk_size) is not int or not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"file {name}: chunk size {chunk_size!r} is out of range")
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
class Record:
    """A decoded pool manifest."""

    name: str
    manifest: Manifest
    pushed: str
    stored_bytes: int
    files: tuple[FileRecord, ...]
    origin: Origin | None = None

    @property
    def size(self) -> int:
        """The image's size (sum of its files)."""
        return sum(f.size for f in self.files)

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
            data = json.loads(_cas.bounded_decompress(blob, MAX_RECORD))
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


def decode_list_object(blob: bytes, sha256: str) -> list[bytes]:
    """Decode and verify a list object; :class:`ValueError` if it does not match."""
    raw = _cas.bounded_decompress(blob, MAX_LIST)
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError("does not match its SHA-256")
    return _cas.decode_list(raw)
