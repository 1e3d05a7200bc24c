"""The image manifest, ``torpor.json``: what an image is, where it came from, what it holds.

An image is a directory of CRIU's files plus this manifest. The manifest records every file's
size and SHA-256 so a restore can refuse a corrupted or truncated image before anything runs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .._errors import ImageError, UnsafeImageError
from .._safe import check_name, open_dir, read_regular
from ._layout import MANIFEST_NAME as MANIFEST_NAME
from ._layout import MAX_MANIFEST, is_bookkeeping

FORMAT_VERSION = 1


@dataclass(frozen=True)
class FileEntry:
    """One file of an image: its name inside the image directory, size and SHA-256 (hex)."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """Everything torpor knows about an image (immutable; use :meth:`evolve` to derive)."""

    id: str
    name: str
    created: str
    host: str
    kernel: str
    criu_version: str
    cpu_flags: tuple[str, ...]
    cmdline: tuple[str, ...]
    pid: int
    rss_bytes: int
    files: tuple[FileEntry, ...]
    format: int = FORMAT_VERSION
    tcp_established: bool = False
    shell_job: bool = False
    coordinated: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    # The supervision spec of the process (``_supervise._spec.Spec.to_json()``) when it was
    # supervised: how another host resumes it. Checked here only for shape and size; its
    # fields are checked by ``Spec.from_json`` where it is used. Absent from older manifests.
    supervision: Mapping[str, Any] | None = None

    @property
    def total_bytes(self) -> int:
        """Sum of the sizes of the image's files."""
        return sum(f.size for f in self.files)

    def evolve(self, **changes: Any) -> Manifest:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)

    def to_json(self) -> str:
        """Serialise to the on-disk JSON form (stable key order)."""
        data = asdict(self)
        data["labels"] = dict(self.labels)
        if self.supervision is None:
            del data["supervision"]  # a manifest of an unsupervised process reads as before
        else:
            data["supervision"] = dict(self.supervision)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "torpor.json") -> Manifest:
        """Parse a manifest. Anything but a well-formed manifest of a format this torpor knows
        raises :class:`ImageError` (never another exception: the text comes from outside); a
        file name that is not a plain name raises :class:`UnsafeImageError` naming it."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            raise _malformed(source, f"not JSON: {exc}") from exc
        return _parse(data, source)


# Types are checked exactly (JSON's true is not a number here); the fields a manifest must have
# are the string and integer ones and files.
_STR_FIELDS = ("id", "name", "created", "host", "kernel", "criu_version")
_INT_FIELDS = ("pid", "rss_bytes")
_BOOL_FIELDS = ("tcp_established", "shell_job", "coordinated")
_LIST_FIELDS = ("cpu_flags", "cmdline")
_KNOWN = frozenset(
    (
        *_STR_FIELDS,
        *_INT_FIELDS,
        *_BOOL_FIELDS,
        *_LIST_FIELDS,
        "files",
        "labels",
        "format",
        "supervision",
    )
)
# A spec is a few hundred bytes of flat fields and one list (the command).
MAX_SUPERVISION = 16 * 1024
_MAX_SUPERVISION_DEPTH = 3
_MAX_INT = (1 << 63) - 1
_DISTRUST = "the image was made or changed by something other than torpor: do not use it"
_MAX_PID = (1 << 31) - 1
_ID_RE = re.compile(r"[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _parse(data: object, source: str) -> Manifest:
    if not isinstance(data, dict):
        raise _malformed(source, "not a JSON object")
    fmt = data.get("format", FORMAT_VERSION)
    if not _is_int(fmt) or fmt < 0:
        raise _malformed(source, f"format {fmt!r} is not a version number")
    if fmt > FORMAT_VERSION:
        raise ImageError(
            f"{source}: image format {fmt} is newer than this torpor understands "
            f"({FORMAT_VERSION})",
            hint="upgrade torpor",
        )
    unknown = sorted(str(k) for k in data if k not in _KNOWN)
    if unknown:
        raise _malformed(source, f"unknown field {unknown[0]!r}")
    missing = [k for k in (*_STR_FIELDS, *_INT_FIELDS, "files") if k not in data]
    if missing:
        raise _malformed(source, f"no {missing[0]!r}")
    for key in _STR_FIELDS:
        if not isinstance(data[key], str):
            raise _malformed(source, f"{key} is not a string")
    if not _ID_RE.fullmatch(data["id"]):
        raise _malformed(source, f"id {data['id']!r} is not 32 hex digits")
    # The name becomes a file name (a pool's cache, a restored process's record).
    check_name(data["name"], source=source, what="image name")
    for key in _INT_FIELDS:
        if not _is_int(data[key]) or not 0 <= data[key] <= _MAX_INT:
            raise _malformed(source, f"{key} {data[key]!r} is not a non-negative integer")
    if data["pid"] > _MAX_PID:
        raise _malformed(source, f"pid {data['pid']} is out of range")
    for key in _BOOL_FIELDS:
        if not isinstance(data.get(key, False), bool):
            raise _malformed(source, f"{key} is not true or false")
    for key in _LIST_FIELDS:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _malformed(source, f"{key} is not a list of strings")
    labels = data.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise _malformed(source, "labels is not an object of strings")
    supervision = _parse_supervision(data.get("supervision"), source)
    return Manifest(
        id=data["id"],
        name=data["name"],
        created=data["created"],
        host=data["host"],
        kernel=data["kernel"],
        criu_version=data["criu_version"],
        cpu_flags=tuple(data.get("cpu_flags", ())),
        cmdline=tuple(data.get("cmdline", ())),
        pid=data["pid"],
        rss_bytes=data["rss_bytes"],
        files=_parse_files(data["files"], source),
        format=fmt,
        tcp_established=data.get("tcp_established", False),
        shell_job=data.get("shell_job", False),
        coordinated=data.get("coordinated", False),
        labels=dict(labels),
        supervision=supervision,
    )


def _parse_supervision(value: object, source: str) -> dict[str, Any] | None:
    """The ``supervision`` field: absent (None), or a JSON object of bounded size and depth."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _malformed(source, "supervision is not an object")
    if _too_deep(value, _MAX_SUPERVISION_DEPTH):
        raise _malformed(source, "supervision is nested too deep")
    if len(json.dumps(value)) > MAX_SUPERVISION:
        raise _malformed(source, f"supervision is over {MAX_SUPERVISION} bytes")
    return value


def _too_deep(value: object, limit: int) -> bool:
    """Whether JSON containers nest in ``value`` more than ``limit`` deep (never recursing
    further than ``limit``: hostile nesting cannot exhaust the stack)."""
    if isinstance(value, dict):
        items: list[object] = list(value.values())
    elif isinstance(value, list):
        items = list(value)
    else:
        return False
    return limit <= 0 or any(_too_deep(v, limit - 1) for v in items)


def _parse_files(value: object, source: str) -> tuple[FileEntry, ...]:
    if not isinstance(value, list):
        raise _malformed(source, "files is not a list")
    out: list[FileEntry] = []
    seen: set[str] = set()
    for item in value:
        if not isinstance(item, dict) or set(item) != {"name", "size", "sha256"}:
            raise _malformed(source, "a file entry is not {name, size, sha256}")
        name = check_name(item["name"], source=source)
        if is_bookkeeping(name):
            raise UnsafeImageError(
                f"{source}: lists torpor's own file {name} as part of the image; refused",
                image=source,
                file=name,
                hint=_DISTRUST,
            )
        if name in seen:
            raise UnsafeImageError(
                f"{source}: lists file {name} twice; refused",
                image=source,
                file=name,
                hint=_DISTRUST,
            )
        seen.add(name)
        size, sha = item["size"], item["sha256"]
        if not _is_int(size) or not 0 <= size <= _MAX_INT:
            raise _malformed(source, f"file {name} has size {size!r}")
        if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
            raise _malformed(source, f"file {name} has SHA-256 {sha!r}, not 64 hex digits")
        out.append(FileEntry(name=name, size=size, sha256=sha))
    return tuple(out)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _malformed(source: str, what: str) -> ImageError:
    return ImageError(
        f"{source}: malformed manifest ({what})",
        image=source,
        hint="the image is damaged or was not made by torpor: checkpoint again",
    )


def new_id() -> str:
    """A fresh image id (32 hex digits)."""
    return os.urandom(16).hex()


def now_iso() -> str:
    """The current UTC time, ISO 8601 with microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def cpu_flags() -> tuple[str, ...]:
    """This machine's CPU flags (from /proc/cpuinfo), sorted."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return tuple(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ()


def build(
    *,
    name: str,
    pid: int,
    files: Iterable[FileEntry],
    criu_version: str,
    cmdline: Iterable[str],
    rss_bytes: int,
    image_id: str | None = None,
    **extra: Any,
) -> Manifest:
    """A manifest for an image just dumped on this host."""
    # Imported here: only dumps need them, and restores should not pay for the import.
    import platform
    import socket

    return Manifest(
        id=image_id or new_id(),
        name=name,
        created=now_iso(),
        host=socket.gethostname(),
        kernel=platform.release(),
        criu_version=criu_version,
        cpu_flags=cpu_flags(),
        cmdline=tuple(cmdline),
        pid=pid,
        rss_bytes=rss_bytes,
        files=tuple(sorted(files, key=lambda f: f.name)),
        **extra,
    )


def read(image_dir: Path, *, dir_fd: int | None = None) -> Manifest:
    """Read and parse ``image_dir/torpor.json`` (relative to ``dir_fd``, the directory opened,
    when given): a symlink, FIFO or over-large file there is refused."""
    return Manifest.from_json(
        read_bytes(image_dir, dir_fd=dir_fd), source=str(image_dir / MANIFEST_NAME)
    )


def read_bytes(image_dir: Path, *, dir_fd: int | None = None) -> bytes:
    """The raw bytes of ``image_dir/torpor.json`` (what its signature covers)."""
    fd = open_dir(image_dir) if dir_fd is None else dir_fd
    try:
        return read_regular(fd, MANIFEST_NAME, source=str(image_dir), limit=MAX_MANIFEST)
    except FileNotFoundError as exc:
        raise ImageError(
            f"{image_dir} is not a torpor image (no {MANIFEST_NAME})",
            image=image_dir,
            hint="a half-written image never has a manifest; checkpoint again",
        ) from exc
    finally:
        if dir_fd is None:
            os.close(fd)
