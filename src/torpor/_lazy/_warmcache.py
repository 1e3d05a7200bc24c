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
file it was made from (``_warm``); its stamp names the image's path too. Used only while
:meth:`Image.trusted` holds (the caller checks it): the image's files are then the ones its
manifest hashes, so the pagemaps this directory's were derived from are the image's, and its
symlinks (by the image's path) lead to them. A warm set changed by a later restore is another
key: a new directory, the old one removed once nobody uses it. A directory is complete only
once its stamp (:data:`STAMP`, holding the key, written last) is in it; made in a temporary
directory and renamed into place, never changed afterwards (but for its mtime: see below).
One found in its place without a sound stamp (an interrupted removal left it) is removed, if
nobody holds it, and the rename tried again.

**What the cache may take.** Each :func:`ensure` (the cache's only writer) also removes the
entries whose image is no longer at the path their stamp names (deleted, or another image
there now: no lookup could find them again) and those without a sound stamp, then the least
recently used (an entry's mtime: when it was made, or kept by an ensure after a restore used
it) until those left take at most :func:`limit`: :data:`CACHE_BYTES`, or
``$TORPOR_WARM_CACHE_BYTES``, and at most a tenth of the free space. Only through
:func:`remove`: an entry a restore or its daemon holds stays, whatever it costs.

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
from .._images import _manifest
from .._images._image import Image
from .._images._manifest import Manifest, now_iso
from . import _eager, _warm

STAMP = "torpor-warm-image.json"
_MAX_STAMP = 4096
_ENTRY = re.compile(r"([0-9a-f]{32})-([0-9a-f]{32})")
_TMP = ".tmp-"
_TMP_GRACE = 120.0  # seconds a temporary directory may be one still being made
# What the kept warm images may take, all told (one is a few task pagemaps: ~10-100 KiB).
CACHE_BYTES = 256 << 20
CACHE_BYTES_ENV = "TORPOR_WARM_CACHE_BYTES"
_FREE_SHARE = 10  # at most a tenth of the free space (with theirs)


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
        stamp_key, warm_bytes, _ = _stamp(fd, root)
        if stamp_key != k:
            raise ValueError("not this warm image's stamp")
    except (OSError, ValueError, RecursionError, TorporError):
        os.close(fd)
        return None
    return Kept(root / name, fd, warm_bytes)


def _stamp(fd: int, root: Path) -> tuple[str, int, str]:
    """The key, warm bytes and image path in the stamp of the entry open at ``fd``;
    ``ValueError`` (or ``OSError``, ``RecursionError``, :class:`TorporError`) if unsound."""
    stamp = json.loads(_safe.read_regular(fd, STAMP, source=str(root), limit=_MAX_STAMP))
    if not isinstance(stamp, dict) or set(stamp) != {"key", "warm_bytes", "image"}:
        raise ValueError("not a warm image's stamp")
    k, warm_bytes, path = stamp["key"], stamp["warm_bytes"], stamp["image"]
    if (
        not isinstance(k, str)
        or not isinstance(path, str)
        or not os.path.isabs(path)
        or not isinstance(warm_bytes, int)
        or isinstance(warm_bytes, bool)
        or warm_bytes <= 0
    ):
        raise ValueError("not a warm image's stamp")
    return k, warm_bytes, path


def ensure(image: Image) -> bool:
    """Make and keep ``image``'s warm image for its current warm set unless it is kept
    already; remove its others nobody uses. True if one is kept now. Reads the image's
    pagemaps: only while it is trusted (checked before and after).

    Never raises for what the disk or the image does (a full disk, an image gone or changed:
    ``OSError``, :class:`TorporError`): the warm image is only an optimisation, so that is
    one line on stderr and False, and the restore that called it goes on as it was."""
    kept = None
    try:
        kept = _ensure(image)
    except (OSError, TorporError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(
            f"{now_iso()} lazy restore: warm image of {image.path} not kept: {why}",
            file=sys.stderr,
            flush=True,
        )
    with contextlib.suppress(OSError, TorporError):
        _sweep(cache_dir(), keep=kept)
    return kept is not None


def _ensure(image: Image) -> str | None:
    """:func:`ensure`'s work; the name of the entry kept, or None."""
    current = _current(image)
    if current is None:
        return None
    raw, k, name = current
    kept = _open(name, k)
    if kept is not None:
        with contextlib.suppress(OSError):
            os.utime(kept.fd)  # used: the last to be evicted (see _sweep)
        os.close(kept.fd)
        _prune(image, keep=name)
        return name
    try:
        warm = _warm.check(image, json.loads(raw))
    except (ValueError, RecursionError):
        return None
    if not warm or not image.trusted():
        return None
    root = cache_dir()
    tmp = root / f"{_TMP}{secrets.token_hex(8)}"
    made = None
    try:
        made = _eager.warm_image(image, warm, tmp)
        if made is None or not image.trusted():
            return None
        stamp = {"key": k, "warm_bytes": made[1], "image": str(image.path)}
        with _safe.opened_dir(tmp) as fd:
            _safe.replace_file(
                fd, STAMP, json.dumps(stamp).encode(), source=str(tmp), durable=False
            )
        if not _place(root, tmp, name, k):
            return None
        made = None  # in place now (or one as good was)
    finally:
        if made is not None or tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _prune(image, keep=name)
    return name


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


def limit(root: Path, used: int) -> int:
    """The bytes the kept warm images in ``root`` (taking ``used`` now) may take:
    :data:`CACHE_BYTES`, or ``$TORPOR_WARM_CACHE_BYTES``, and at most a tenth of their file
    system's free space with theirs (a disk filling up keeps fewer)."""
    cap = CACHE_BYTES
    env = os.environ.get(CACHE_BYTES_ENV, "").strip()
    if env:
        if env.isdigit():
            cap = int(env)
        else:
            print(
                f"{now_iso()} lazy restore: {CACHE_BYTES_ENV}={env!r} is not a number of "
                f"bytes (digits only); {CACHE_BYTES} used",
                file=sys.stderr,
                flush=True,
            )
    try:
        st = os.statvfs(root)
    except OSError:
        return cap
    return min(cap, (st.f_bavail * st.f_frsize + used) // _FREE_SHARE)


def _sweep(root: Path, *, keep: str | None) -> None:
    """Remove, if nobody holds them (:func:`remove`), the kept warm images whose image is no
    longer there (or is another image now) or whose stamp is not sound, then the least
    recently used (made, or kept by :func:`ensure`) until those left take at most
    :func:`limit`. ``keep`` (the one :func:`ensure` just kept) stays."""
    try:
        names = sorted(e.name for e in os.scandir(root) if _ENTRY.fullmatch(e.name))
    except OSError:
        return
    left: list[tuple[float, str, int]] = []
    for name in names:
        seen = _survey(root, name)
        if seen is not None:
            left.append((seen[0], name, seen[1]))
        elif name != keep:
            remove(root, name)
    used = sum(size for _, _, size in left)
    cap = limit(root, used)
    for _, name, size in sorted(left):  # the least recently used first
        if used <= cap:
            break
        if name != keep and remove(root, name):
            used -= size


def _survey(root: Path, name: str) -> tuple[float, int] | None:
    """The entry ``name``'s last use (its mtime) and the bytes it takes; None if it is of no
    use: its stamp is not sound, or the image it names has another id now, or is gone."""
    try:
        fd = _safe.open_dir(root / name)
    except (OSError, TorporError):
        return None
    try:
        _, _, path = _stamp(fd, root)
        st = os.fstat(fd)
        size = st.st_blocks * 512 + sum(e.st_blocks * 512 for e in _safe.lstat_entries(fd).values())
    except (OSError, ValueError, RecursionError, TorporError):
        return None
    finally:
        os.close(fd)
    try:
        manifest = Manifest.from_json(_manifest.read_bytes(Path(path)), source=path)
    except (OSError, TorporError):
        return None
    if manifest.id != name.split("-", 1)[0]:
        return None
    return st.st_mtime, size


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
