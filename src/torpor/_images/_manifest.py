"""The image manifest, ``torpor.json``: what an image is, where it came from, what it holds.

An image is a directory of CRIU's files plus this manifest. The manifest records every file's
size and SHA-256 so a restore can refuse a corrupted or truncated image before anything runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .._errors import ImageError

MANIFEST_NAME = "torpor.json"
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
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "torpor.json") -> Manifest:
        """Parse a manifest; a malformed or future-format one raises :class:`ImageError`."""
        try:
            data = json.loads(text)
            fmt = int(data.get("format", 0))
            if fmt > FORMAT_VERSION:
                raise ImageError(
                    f"{source}: image format {fmt} is newer than this torpor understands "
                    f"({FORMAT_VERSION})",
                    hint="upgrade torpor",
                )
            files = tuple(FileEntry(**f) for f in data.pop("files"))
            return cls(
                files=files,
                cpu_flags=tuple(data.pop("cpu_flags", ())),
                cmdline=tuple(data.pop("cmdline", ())),
                labels=dict(data.pop("labels", {})),
                **data,
            )
        except ImageError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ImageError(f"{source}: malformed manifest ({exc})") from exc


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


def read(image_dir: Path) -> Manifest:
    """Read ``image_dir/torpor.json``."""
    path = image_dir / MANIFEST_NAME
    try:
        text = path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageError(
            f"{image_dir} is not a torpor image (no {MANIFEST_NAME})",
            image=image_dir,
            hint="a half-written image never has a manifest; checkpoint again",
        ) from exc
    return Manifest.from_json(text, source=str(path))
