"""Warm images kept between local lazy restores: made once per warm set, off the path.

A local lazy restore of a trusted image with a warm set restores from a *warm image*
(``_eager``): symlinks to the image's files and its task pagemaps rewritten so that the warm
pages are not ``PE_LAZY``. Working those pagemaps out (decoding the pagemaps, splitting ~200
ranges out of their extents, encoding them again) and making the directory cost 5-10 ms of
each restore's path here, 20-30 ms on a loaded machine. This module keeps the warm image, once
made, in ``<home>/lazy/warm/images/<image id>-<key>/`` so that the next restore of the same
image with the same warm set only opens it (:func:`lookup`, ~0.2 ms); a copy made resident
makes the one for the (possibly grown) warm set it leaves (:func:`ensure`, in the keeper's
watch thread, after the copy's first answer).

**What a kept warm image is valid for.** ``<key>`` is a SHA-256 of the image's path, its
manifest's id and every file it lists (name, size, SHA-256) and the bytes of the warm set
file it was made from (``_warm``). Used only while :meth:`Image.trusted` holds (the caller
checks it): the image's files are then the ones its manifest hashes, so the pagemaps this
directory's were derived from are the image's, and its symlinks (by the image's path) lead to
them. A warm set changed by a later restore is another key: a new directory, the old one
removed once nobody uses it. A directory is complete only once its stamp
(:data:`STAMP`, holding the key, written last) is in it; made in a temporary directory and
renamed into place, never changed afterwards. One found in its place without a sound stamp
(an interrupted removal left it) is removed, if nobody holds it, and the rename tried again.

**Hostile-input rules.** Everything here is in torpor's private home, but is still read as
outside input: the cache directory and each entry are opened ``O_NOFOLLOW`` and must be
private (ours or root's, not writable by group or others), the stamp is read through the
entry's fd as a plain small regular file and must name exactly the key asked for; anything
else is a miss (the restore makes its warm image itself, as before). The restore's CRIU checks
the entry's symlinks (``_engine``'s image-directory checks) like any image directory's.

**Removal while in use.** A restore holds a shared ``flock`` on its entry's directory fd from
:func:`lookup` on; the daemon inherits that very fd (its ``-D``), so the lock lasts while
either lives. An entry is removed only under an exclusive, non-blocking lock: its stamp first
(a restore that opened it meanwhile finds no stamp: a miss), then its files, through the
locked fd, then the name (``rmdir``: fails on a directory made there since). A crashed
process's locks go with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import _paths, _safe
from .._errors import TorporError
from .._images._image import Image
from .._images._manifest import now_iso
from . import _eager, _warm

STAMP = "torpor-warm-image.json"
_MAX_STAMP = 4096
_ENTRY = re.compile(r"([0-9a-f]{32})-([0-9a-f]{32})")
_TMP = ".tmp-"
_TMP_GRACE = 120.0  # seconds a temporary directory may be one still being made


@dataclass(frozen=True)
class Kept:
    """A kept warm image found valid, its directory open and share-locked (``fd``: the
    caller's, to hand to CRIU and to close)."""

    path: Path
    fd: int
    warm_bytes: int


def cache_dir() -> Path:
    """``<home>/lazy/warm/images``."""
    return _paths.private_dir(_warm.warm_dir() / "images", what="warm image directory")


def key(image: Image, warm_raw: bytes) -> str:
    """The key of ``image``'s warm image made from the warm set file's bytes ``warm_raw``."""
    m = image.manifest
    files = sorted((e.name, e.size, e.sha256) for e in m.files)
    data = json.dumps([str(image.path), m.id, files, hashlib.sha256(warm_raw).hexdigest()])
    return hashlib.sha256(data.encode()).hexdigest()[:32]


def _name(image: Image, k: str) -> str | None:
    name = f"{image.manifest.id}-{k}"
    return name if _ENTRY.fullmatch(name) else None


def _current(image: Image) -> tuple[bytes, str, str] | None:
    """``image``'s warm set file's bytes, the key of its warm image and that image's entry
    name; None if it has no warm set (or the name would not be one of ours)."""
    raw = _warm.read_raw(image)
    if raw is None:
        return None
    k = key(image, raw)
    name = _name(image, k)
    return None if name is None else (raw, k, name)


def lookup(image: Image) -> Kept | None:
    """``image``'s kept warm image for its current warm set, or None (none, incomplete, being
    removed, or not sound: see the module docstring). The caller checks ``image.trusted()``."""
    current = _current(image)
    return None if current is None else _open(current[2], current[1])


def _open(name: str, k: str) -> Kept | None:
    """The kept warm image ``name``, share-locked, if its stamp names the key ``k``."""
    try:
        root = cache_dir()
        fd = _safe.open_dir(root / name)
    except (OSError, TorporError):
        return None
    try:
        _safe.check_private(root / name, what="warm image", fd=fd)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # held by us and the daemon
        stamp = json.loads(_safe.read_regular(fd, STAMP, source=str(root), limit=_MAX_STAMP))
        if not isinstance(stamp, dict) or set(stamp) != {"key", "warm_bytes"}:
            raise ValueError("not a warm image's stamp")
        warm_bytes = stamp["warm_bytes"]
        if (
            stamp["key"] != k
            or not isinstance(warm_bytes, int)
            or isinstance(warm_bytes, bool)
            or warm_bytes <= 0
        ):
            raise ValueError("not this warm image's stamp")
    except (OSError, ValueError, RecursionError, TorporError):
        os.close(fd)
        return None
    return Kept(root / name, fd, warm_bytes)


def ensure(image: Image) -> bool:
    """Make and keep ``image``'s warm image for its current warm set unless it is kept
    already; remove its others nobody uses. True if one is kept now. Reads the image's
    pagemaps: only while it is trusted (checked before and after).

    Never raises for what the disk or the image does (a full disk, an image gone or changed:
    ``OSError``, :class:`TorporError`): the warm image is only an optimisation, so that is
    one line on stderr and False, and the restore that called it goes on as it was."""
    try:
        return _ensure(image)
    except (OSError, TorporError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(
            f"{now_iso()} lazy restore: warm image of {image.path} not kept: {why}",
            file=sys.stderr,
            flush=True,
        )
        return False


def _ensure(image: Image) -> bool:
    current = _current(image)
    if current is None:
        return False
    raw, k, name = current
    kept = _open(name, k)
    if kept is not None:
        os.close(kept.fd)
        _prune(image, keep=name)
        return True
    try:
        warm = _warm.check(image, json.loads(raw))
    except (ValueError, RecursionError):
        return False
    if not warm or not image.trusted():
        return False
    root = cache_dir()
    tmp = root / f"{_TMP}{secrets.token_hex(8)}"
    made = None
    try:
        made = _eager.warm_image(image, warm, tmp)
        if made is None or not image.trusted():
            return False
        stamp = json.dumps({"key": k, "warm_bytes": made[1]}).encode()
        with _safe.opened_dir(tmp) as fd:
            _safe.replace_file(fd, STAMP, stamp, source=str(tmp), durable=False)
        if not _place(root, tmp, name, k):
            return False
        made = None  # in place now (or one as good was)
    finally:
        if made is not None or tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _prune(image, keep=name)
    return True


def _place(root: Path, tmp: Path, name: str, k: str) -> bool:
    """Rename the warm image made in ``tmp`` to ``name``; True if one for key ``k`` is there
    now. One there already is as good if sound (another copy made it meanwhile); one that is
    not (no stamp: a removal or a crash left it) would be a miss for good, so it is removed,
    if nobody holds it, and the rename tried once more."""
    if _rename(tmp, root / name):
        return True
    kept = _open(name, k)
    if kept is not None:
        os.close(kept.fd)
        return True
    return remove(root, name) and _rename(tmp, root / name)


def _rename(src: Path, dst: Path) -> bool:
    try:
        os.rename(src, dst)
    except OSError:
        return False
    return True


def _prune(image: Image, *, keep: str) -> None:
    """Remove ``image``'s kept warm images but ``keep``, and temporary directories older than
    :data:`_TMP_GRACE`, that nobody uses (an exclusive lock taken without waiting)."""
    root = cache_dir()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        m = _ENTRY.fullmatch(entry.name)
        if m is not None:
            if entry.name == keep or m.group(1) != image.manifest.id:
                continue
        elif entry.name.startswith(_TMP):
            with contextlib.suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime < _TMP_GRACE:
                    continue
        else:
            continue
        remove(root, entry.name)


def remove(root: Path, name: str) -> bool:
    """Remove the kept warm image ``name`` of ``root`` if nobody holds it (see the module
    docstring); True if it went."""
    try:
        root_fd = _safe.open_dir(root)
        try:
            fd = _safe.open_dir(name, dir_fd=root_fd)
        finally:
            os.close(root_fd)
    except (OSError, TorporError):
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # in use
        with contextlib.suppress(FileNotFoundError):
            os.unlink(STAMP, dir_fd=fd)  # first: whoever opens it now finds it incomplete
        for entry, st in _safe.lstat_entries(fd).items():
            if not stat.S_ISDIR(st.st_mode):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        os.rmdir(root / name)  # fails if a directory made there since holds anything
    except OSError:
        return False
    return True
