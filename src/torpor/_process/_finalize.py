"""Finishing a self-dump: the files CRIU wrote into a staging directory become an image.

Everything here works relative to directory fds, never through a path another process could
swap: :func:`seal` hashes the staged files (regular files only: a symlink, FIFO or device is
refused, never followed) and writes the manifest, its signature and the verification stamp
(each created ``O_EXCL``/``O_NOFOLLOW``, 0600); :func:`publish` renames the staging directory
to its image name beside it (``renameat2`` relative to the parent's fd, never replacing).

Two callers:

- a keeper, for a child that asked it for a dump (``_keeper_dump``): it seals the staging
  directory while the directory is the keeper's (root's, 0700: nothing else can write in it),
  giving the files to the child's uid, and the rename is done with the child's credentials;
- a process torpor did not start, which dumps itself through a detached finaliser
  (``_selfdump``): before the dump it writes :data:`PENDING_NAME` (what the manifest needs)
  into the staging directory; CRIU writes :data:`SUCCESS_MARK` only after a successful dump.
  With ``leave_running`` the process finalises the image itself, otherwise (CRIU killed it)
  the finaliser does, once CRIU has exited: one of the two, never both.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import AlreadyExistsError, ImageError, TorporError, UnsafeImageError
from .._images import _manifest, _signature
from .._images._hashing import hash_files
from .._images._image import write_stamp
from .._images._layout import MANIFEST_NAME, SIGNATURE_NAME, VERIFIED_NAME, is_bookkeeping
from .._images._manifest import Manifest
from .._safe import (
    create_file,
    is_plain_name,
    kind_problem,
    lstat_entries,
    open_dir,
    open_regular,
    read_regular,
    replace_file,
)

PENDING_NAME = "torpor.pending.json"
SUCCESS_MARK = "stats-dump"
_MAX_PENDING = 1 << 20
_RENAME_NOREPLACE = 1


@dataclass(frozen=True)
class ImageFacts:
    """What a self-dump's manifest says besides its files."""

    name: str
    pid: int
    cmdline: tuple[str, ...]
    rss_bytes: int
    criu_version: str
    tcp_established: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)


def give(dir_fd: int, names: list[str], owner: tuple[int, int] | None, *, source: str) -> None:
    """Make the regular files ``names`` of ``dir_fd`` 0600 and, if ``owner`` is given, owned
    by that ``(uid, gid)``; a symlink, FIFO or device among them is refused, never followed."""
    for name in names:
        fd = open_regular(dir_fd, name, source=source)
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def seal(
    dir_fd: int, facts: ImageFacts, *, source: str, owner: tuple[int, int] | None = None
) -> Manifest:
    """Turn the dumped staging directory ``dir_fd`` into a complete image directory (not yet
    renamed into place, see :func:`publish`): every file but torpor's bookkeeping files is
    part of the image, hashed into the manifest; the manifest is signed by this host when it
    has a key (best effort: the dumped process may be gone, losing the image would lose it).
    With ``owner`` every file ends up owned by that ``(uid, gid)``."""
    entries = lstat_entries(dir_fd)
    names = sorted(n for n in entries if not is_bookkeeping(n))
    for name in names:
        kind = kind_problem(entries[name].st_mode)
        if kind is not None:
            raise UnsafeImageError(
                f"staged image {source} holds {name}, {kind}, not a regular file; refused",
                image=source,
                file=name,
                hint="something other than CRIU wrote into the staging directory",
            )
    # Owner and mode first: changing them changes the files' ctime, which the stamp records.
    give(dir_fd, sorted(entries), owner, source=source)
    files = hash_files(dir_fd, names, source=source)
    manifest = _manifest.build(
        name=facts.name,
        pid=facts.pid,
        files=files,
        criu_version=facts.criu_version,
        cmdline=facts.cmdline,
        rss_bytes=facts.rss_bytes,
        tcp_established=facts.tcp_established,
        coordinated=True,
        labels=dict(facts.labels),
    )
    raw = manifest.to_json().encode()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SIGNATURE_NAME, dir_fd=dir_fd)  # not this manifest's
    replace_file(dir_fd, MANIFEST_NAME, raw, source=source)
    made = [MANIFEST_NAME]
    try:
        _, signature = _signature.sign(raw)
    except (TorporError, OSError):
        pass  # no usable host key: unsigned
    else:
        replace_file(dir_fd, SIGNATURE_NAME, signature, source=source)
        made.append(SIGNATURE_NAME)
    stats = {n: os.stat(n, dir_fd=dir_fd, follow_symlinks=False) for n in names}
    write_stamp(dir_fd, manifest, stats)
    if VERIFIED_NAME in os.listdir(dir_fd):
        made.append(VERIFIED_NAME)
    give(dir_fd, made, owner, source=source)
    return manifest


def rename_noreplace(parent_fd: int, staging_name: str, dest_name: str) -> None:
    """``renameat2(RENAME_NOREPLACE)`` within the directory ``parent_fd``; ``OSError``
    (``FileExistsError`` when ``dest_name`` exists, even as a symlink)."""
    libc = ctypes.CDLL(None, use_errno=True)
    src, dst = os.fsencode(staging_name), os.fsencode(dest_name)
    if libc.renameat2(parent_fd, src, parent_fd, dst, _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dest_name)


@contextmanager
def published(where: Path, staging_name: str, dest_name: str) -> Iterator[None]:
    """Around the rename of the sealed ``staging_name`` to ``dest_name`` in ``where``: a
    destination that exists becomes :class:`AlreadyExistsError` (the image stays staged)."""
    try:
        yield
    except FileExistsError as exc:
        raise AlreadyExistsError(
            f"image directory {where / dest_name} appeared while checkpointing",
            path=str(where / dest_name),
            hint=f"the new image is kept at {where / staging_name}",
        ) from exc


def publish(parent_fd: int, staging_name: str, dest_name: str, *, where: Path) -> None:
    """Rename the sealed staging directory ``staging_name`` of ``parent_fd`` to ``dest_name``
    beside it, never replacing what is there (:class:`AlreadyExistsError`), durably. ``where``
    (the parent's path) is for messages."""
    with published(where, staging_name, dest_name):
        rename_noreplace(parent_fd, staging_name, dest_name)
    os.fsync(parent_fd)


# -- a process torpor did not start ----------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """What a self-dump through a detached finaliser records before it starts; ``dest`` is
    the image's name beside the staging directory."""

    dest: str
    facts: ImageFacts
    leave_running: bool

    def write(self, dir_fd: int) -> None:
        """Store in the staging directory ``dir_fd`` (a new file: never through a symlink)."""
        data: dict[str, Any] = dict(self.facts.__dict__)
        data.update(cmdline=list(self.facts.cmdline), labels=dict(self.facts.labels))
        data.update(dest=self.dest, leave_running=self.leave_running)
        fd = create_file(dir_fd, PENDING_NAME, source="staging directory")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)

    @classmethod
    def read(cls, dir_fd: int, *, source: str) -> Pending:
        """Load from the staging directory ``dir_fd``; ``FileNotFoundError`` if there is none,
        :class:`ImageError` if it is not one a self-dump wrote."""
        raw = read_regular(dir_fd, PENDING_NAME, source=source, limit=_MAX_PENDING)
        try:
            d = json.loads(raw)
            labels = d["labels"]
            ok = (
                is_plain_name(d["dest"])
                and isinstance(d["name"], str)
                and type(d["pid"]) is int
                and isinstance(d["cmdline"], list)
                and all(isinstance(a, str) for a in d["cmdline"])
                and type(d["rss_bytes"]) is int
                and isinstance(d["criu_version"], str)
                and type(d["tcp_established"]) is bool
                and type(d["leave_running"]) is bool
                and isinstance(labels, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise ImageError(f"{source}: {PENDING_NAME} is not a self-dump's record", image=source)
        facts = ImageFacts(
            name=d["name"],
            pid=d["pid"],
            cmdline=tuple(d["cmdline"]),
            rss_bytes=d["rss_bytes"],
            criu_version=d["criu_version"],
            tcp_established=d["tcp_established"],
            labels=labels,
        )
        return cls(dest=d["dest"], facts=facts, leave_running=d["leave_running"])


def finalize(staging: Path) -> Path | None:
    """Turn a successfully dumped staging directory (of a process torpor did not start) into
    its image; its path, or None if there is nothing to do (no record: already finalised; no
    success mark: the dump failed)."""
    parent_fd = open_dir(staging.parent)
    try:
        try:
            dir_fd = open_dir(staging.name, dir_fd=parent_fd)
        except FileNotFoundError:
            return None
        try:
            try:
                pending = Pending.read(dir_fd, source=str(staging))
            except FileNotFoundError:
                return None
            if SUCCESS_MARK not in os.listdir(dir_fd):
                return None
            os.unlink(PENDING_NAME, dir_fd=dir_fd)
            seal(dir_fd, pending.facts, source=str(staging))
        finally:
            os.close(dir_fd)
        publish(parent_fd, staging.name, pending.dest, where=staging.parent)
    finally:
        os.close(parent_fd)
    return staging.parent / pending.dest


def finish_after_criu(staging: Path) -> Path | None:
    """What the detached finaliser does once CRIU has exited: finalise the image if CRIU
    killed the process (with ``leave_running`` the process does it itself). None when there
    is nothing to finalise."""
    try:
        parent_fd = open_dir(staging.parent)
    except FileNotFoundError:
        return None
    try:
        dir_fd = open_dir(staging.name, dir_fd=parent_fd)
    except FileNotFoundError:
        return None
    finally:
        os.close(parent_fd)
    try:
        pending = Pending.read(dir_fd, source=str(staging))
    except FileNotFoundError:
        return None
    finally:
        os.close(dir_fd)
    return None if pending.leave_running else finalize(staging)
