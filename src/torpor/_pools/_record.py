"""Pool manifests: what a pool stores for one image, and the chunk lists they point to.

A pool manifest (key ``images/<name>``) is zstd-compressed JSON::

    {"format": 1, "name": ..., "pushed": ..., "stored_bytes": ...,
     "manifest": {the image's torpor.json},
     "files": [{"name", "size", "sha256", "chunk_size",
                 "digests": "<hex>"                              # short lists, inline
                 | "list": "<id>", "list_sha256": "<hex>", "patch": "<base64>"}]}

A long chunk list lives in a *list object* (key ``lists/<id>``, zstd of the digests back to
back, ``id`` random like a pack id, its SHA-256 in the manifest) and the manifest adds a patch
against it (:func:`~torpor._pools._cas.apply_patch`). Many manifests share one list object;
the manifest is the only thing naming an image, and it is written last.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zstandard

from .._errors import ImageCorruptedError, ImageError
from .._images._manifest import Manifest
from . import _cas

RECORD_FORMAT = 1
IMAGES_PREFIX = "images/"
LISTS_PREFIX = "lists/"


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
    def from_dict(cls, data: dict[str, Any]) -> FileRecord:
        """Parse the JSON form (errors: ``KeyError``/``ValueError``/``TypeError``)."""
        common = (
            str(data["name"]),
            int(data["size"]),
            str(data["sha256"]),
            int(data["chunk_size"]),
        )
        if "digests" in data:
            return cls(*common, inline=bytes.fromhex(data["digests"]))
        return cls(
            *common,
            list_id=str(data["list"]),
            list_sha256=str(data["list_sha256"]),
            patch=base64.b64decode(data["patch"], validate=True),
        )


@dataclass(frozen=True)
class Record:
    """A decoded pool manifest."""

    name: str
    manifest: Manifest
    pushed: str
    stored_bytes: int
    files: tuple[FileRecord, ...]

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
        raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return zstandard.ZstdCompressor(level=9).compress(raw)

    @classmethod
    def decode(cls, name: str, blob: bytes, *, pool: str) -> Record:
        """Parse a stored pool manifest; :class:`ImageCorruptedError` if it is damaged."""
        try:
            data = json.loads(zstandard.ZstdDecompressor().decompress(blob))
            if int(data["format"]) > RECORD_FORMAT:
                raise ValueError(f"format {data['format']} is newer than this torpor")
            return cls(
                name=str(data["name"]),
                manifest=Manifest.from_json(json.dumps(data["manifest"])),
                pushed=str(data["pushed"]),
                stored_bytes=int(data["stored_bytes"]),
                files=tuple(FileRecord.from_dict(f) for f in data["files"]),
            )
        except (ValueError, KeyError, TypeError, zstandard.ZstdError, ImageError) as exc:
            raise ImageCorruptedError(
                f"the manifest of image {name!r} in pool {pool!r} is damaged ({exc})",
                image=name,
                file="manifest",
                hint=f"delete it: torpor image delete {name}@{pool}",
            ) from exc


def encode_list_object(digests: Sequence[bytes]) -> tuple[bytes, str]:
    """The stored form of a list object and the SHA-256 (hex) of its decoded content."""
    raw = _cas.encode_list(digests)
    return zstandard.ZstdCompressor(level=3).compress(raw), hashlib.sha256(raw).hexdigest()


def decode_list_object(blob: bytes, sha256: str) -> list[bytes]:
    """Decode and verify a list object; :class:`ValueError` if it does not match."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob)
    except zstandard.ZstdError as exc:
        raise ValueError(f"does not decompress ({exc})") from exc
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError("does not match its SHA-256")
    return _cas.decode_list(raw)
