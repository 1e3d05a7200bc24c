"""Image directories: written to a staging directory, renamed into place only when complete,
verified against their manifest before use.

torpor restores images as root, so an image directory is outside input until checked, and the
checks live here, in :class:`Image`, for every command that uses one (restore, push, pull,
import, copy):

- the directory is opened ``O_NOFOLLOW`` (not a symlink) and must be private
  (:func:`torpor._safe.check_private`: owned by us or root, not writable by group or others);
  every later step works relative to its fd and checks it is still the same directory;
- its manifest is read through :func:`torpor._safe.read_regular` (no symlink, FIFO or huge
  file) and every field is validated (:meth:`Manifest.from_json`: plain file names only);
- it must hold exactly the files its manifest lists, plus torpor's bookkeeping files
  (:mod:`._layout`), and the manifest must list the files every CRIU image has: a missing or
  unlisted file is refused by name (:class:`~torpor.UnsafeImageError`) before anything is
  hashed, so a file CRIU would read can never escape verification;
- every listed file must be a regular file (a symlink to ``/dev/zero`` or ``/etc/shadow`` is
  refused without being followed), owned by us or root and not writable by group or others;
- a manifest with a signature (``torpor.sig``, :mod:`._signature`) must verify: a manifest
  changed after it was signed is refused (:class:`~torpor.SignatureError`) even where its
  hashes were rewritten to match changed files. :attr:`Image.signer` says who signed; images
  made before torpor signed them have none and are accepted as unsigned, for a policy (a
  pool's ``security.require_signed``) to refuse.

Staging writes the same way: relative to the staging directory's fd, new files ``O_EXCL`` under
a temporary name then renamed, so a symlink planted in a staging directory (which a
self-checkpointing app may be able to write to) is never written through. Every image torpor
makes is finished by :func:`seal` (hash, manifest, signature, stamp, on the directory's fd) and
:func:`publish` (the rename beside it, never replacing): :meth:`Staging.commit` for checkpoints
from outside and repairs, a keeper or a detached finaliser for self-dumps, so how an image is
hashed and signed lives in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .._errors import (
    AlreadyExistsError,
    ImageCorruptedError,
    ImageError,
    ImageNotFoundError,
    TorporError,
    UnsafeImageError,
)
from .._safe import (
    TEMP_PREFIX,
    check_private,
    kind_problem,
    lstat_entries,
    open_dir,
    open_regular,
    read_regular,
    replace_file,
)
from . import _manifest, _signature
from ._hashing import GrowingHasher as GrowingHasher
from ._hashing import hash_files as hash_files
from ._hashing import hash_range as hash_range
from ._layout import (
    MANIFEST_NAME,
    MAX_STAMP,
    REQUIRED_FILES,
    SIGNATURE_NAME,
    VERIFIED_NAME,
    is_bookkeeping,
)
from ._manifest import FileEntry, Manifest
from ._staged import check_same as check_same
from ._staged import give as give
from ._staged import publish as publish
from ._staged import published as published
from ._staged import rename_noreplace as rename_noreplace
from ._staged import staged_files as staged_files

STAGING_MARK = ".partial-"
_DISTRUST = "the image was made or changed by something other than torpor: do not use it"
_NAMES_SHOWN = 5  # an error names at most this many files (then says how many more)


class Image:
    """A complete image directory on local disk (manifest present).

    Opening checks the directory, its manifest and signature, and what the directory holds
    (:meth:`check`: one ``lstat`` per entry); :meth:`trusted` and :meth:`verify` check the
    files again and their content (see the module docstring).
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        *,
        signer: str | None = None,
        dir_id: tuple[int, int] | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        #: The key id whose valid signature the manifest carries, None if it is unsigned.
        self.signer = signer
        # (st_dev, st_ino) of the directory as opened: every later step checks it is the same.
        self._dir_id = dir_id

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Image:
        """Open the image at ``path``: :class:`ImageNotFoundError` if there is none,
        :class:`~torpor.UnsafePathError` for a symlinked or non-private directory,
        :class:`ImageError` for a missing or malformed manifest,
        :class:`~torpor.SignatureError` for a signature that does not verify, and what
        :meth:`check` refuses."""
        p = Path(path)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise ImageError(f"cannot open image {p}: {exc.strerror}", image=p) from exc
        if st is None or not (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise ImageNotFoundError(
                f"no image at {p}", image=str(p), hint="`torpor images` lists the local images"
            )
        fd = open_dir(p)  # a symlink is refused here
        try:
            dst = check_private(p, what="image directory", fd=fd)
            raw = _manifest.read_bytes(p, dir_fd=fd)
            manifest = Manifest.from_json(raw, source=str(p / MANIFEST_NAME))
            signer = _signature.check(fd, raw, source=str(p))
            image = cls(p, manifest, signer=signer, dir_id=(dst.st_dev, dst.st_ino))
            # Here too, not only in verify: a restore without verification (--no-verify) or
            # a push must not read a directory that holds anything but the listed files.
            image._check_layout(fd)
        except OSError as exc:
            raise ImageError(f"cannot read image {p}: {exc.strerror}", image=p) from exc
        finally:
            os.close(fd)
        return image

    @property
    def name(self) -> str:
        """The image's name (from its manifest)."""
        return self.manifest.name

    @property
    def signed_by(self) -> str | None:
        """Same as :attr:`signer`."""
        return self.signer

    @contextmanager
    def opened(self) -> Iterator[int]:
        """The image directory, opened again and checked (not a symlink, private, the same
        directory as when the image was opened): an fd to read its files relative to."""
        try:
            fd = open_dir(self.path)
        except FileNotFoundError as exc:
            raise ImageNotFoundError(
                f"image {self.name!r} ({self.path}) is gone", image=str(self.path)
            ) from exc
        try:
            st = check_private(self.path, what="image directory", fd=fd)
            if self._dir_id is not None and (st.st_dev, st.st_ino) != self._dir_id:
                raise UnsafeImageError(
                    f"image directory {self.path} was replaced since it was opened; refused",
                    image=self.path,
                    hint="open the image again",
                )
            yield fd
        finally:
            os.close(fd)

    def open_file(self, name: str) -> BinaryIO:
        """One of the image's files, opened for reading: it must be listed in the manifest and
        be a regular file in the directory (never a symlink followed)."""
        if name not in {e.name for e in self.manifest.files}:
            raise UnsafeImageError(
                f"image {self.name!r} ({self.path}) has no file {name!r} in its manifest",
                image=self.path,
                file=name,
            )
        with self.opened() as dir_fd:
            fd = open_regular(dir_fd, name, source=str(self.path))
        return os.fdopen(fd, "rb")

    def check(self) -> None:
        """Refuse the image unless its directory holds exactly the files its manifest lists
        (plus torpor's bookkeeping), each a private regular file of the recorded size, and the
        manifest lists what every CRIU image has. No hashing: one ``lstat`` per entry."""
        with self.opened() as fd:
            self._check_layout(fd)

    def verify(self, *, full: bool = False) -> None:
        """:meth:`check`, then every file's size and SHA-256; raise
        :class:`ImageCorruptedError` naming the first bad file (in manifest order).

        Unless ``full``, files whose inode, size, mtime and ctime are exactly as recorded when
        they were last hashed (at checkpoint, or at the last full verification) are trusted
        without re-hashing, as git trusts its index: any write to a file changes its ctime,
        which no user can set back. Hashing a large image costs more than CRIU's restore of it.
        ``full`` re-hashes everything (bit rot on the disk itself changes no timestamp).
        """
        with self.opened() as fd:
            stats = self._check_layout(fd)
            if not full and _read_stamp(fd, self.path) == _stamp(self.manifest, stats):
                return
            actual = hash_files(fd, [e.name for e in self.manifest.files], source=str(self.path))
            for want, got in zip(self.manifest.files, actual, strict=True):
                problem = (
                    f"has {got.size} bytes, expected {want.size}"
                    if got.size != want.size
                    else "does not match its SHA-256"
                    if got.sha256 != want.sha256
                    else None
                )
                if problem is not None:
                    # A stamp must never vouch for a file known bad: the next plain verify
                    # would trust it again (rot changes no timestamp).
                    with contextlib.suppress(OSError):
                        os.unlink(VERIFIED_NAME, dir_fd=fd)
                    raise self._corrupt(want.name, problem)
            for name, before in stats.items():
                after = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if _identity(after) != _identity(before):
                    raise self._corrupt(name, "changed while it was being verified")
            write_stamp(fd, self.manifest, stats)

    def trusted(self) -> bool:
        """Whether every file is exactly as when it was last hashed (see :meth:`verify`).
        Refuses (raises) what :meth:`check` refuses. Costs one ``lstat`` per entry."""
        with self.opened() as fd:
            stats = self._check_layout(fd)
            return _read_stamp(fd, self.path) == _stamp(self.manifest, stats)

    def _check_layout(self, dir_fd: int) -> dict[str, os.stat_result]:
        """The checks of :meth:`check`; the listed files' ``lstat``, by name."""
        try:
            entries = lstat_entries(dir_fd)
        except OSError as exc:
            raise ImageError(
                f"cannot list image {self.path}: {exc.strerror}", image=self.path
            ) from exc
        files = self.manifest.files
        listed = {e.name for e in files}
        for required in REQUIRED_FILES:
            if required not in listed:
                raise UnsafeImageError(
                    f"image {self.name!r} ({self.path}) is refused: its manifest does not list "
                    f"{required}, which every CRIU image has",
                    image=self.path,
                    file=required,
                    hint=_DISTRUST,
                )
        missing = [e.name for e in files if e.name not in entries]
        extra = sorted(n for n in entries if n not in listed and not is_bookkeeping(n))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{_names(missing)} missing")
            if extra:
                parts.append(f"{_names(extra)} not in its manifest")
            raise UnsafeImageError(
                f"image {self.name!r} ({self.path}) does not hold the files its manifest "
                f"lists: {'; '.join(parts)}",
                image=self.path,
                file=(missing or extra)[0],
                hint="restore refused; use another image or checkpoint again",
            )
        euid = os.geteuid()
        stats: dict[str, os.stat_result] = {}
        for entry in files:
            st = entries[entry.name]
            kind = kind_problem(st.st_mode)
            if kind is not None:
                raise self._unsafe(entry.name, f"is {kind}, not a regular file")
            if st.st_uid not in (euid, 0):
                raise self._unsafe(entry.name, f"is owned by uid {st.st_uid}")
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise self._unsafe(
                    entry.name, f"is writable by group or others ({stat.S_IMODE(st.st_mode):04o})"
                )
            if st.st_size != entry.size:
                raise self._corrupt(entry.name, f"has {st.st_size} bytes, expected {entry.size}")
            stats[entry.name] = st
        return stats

    def _corrupt(self, name: str, what: str) -> ImageCorruptedError:
        return ImageCorruptedError(
            f"image {self.name!r} ({self.path}) is corrupted: file {name} {what}",
            image=self.path,
            file=name,
            hint="restore refused; use another image or checkpoint again",
        )

    def _unsafe(self, name: str, what: str) -> UnsafeImageError:
        return UnsafeImageError(
            f"image {self.name!r} ({self.path}): file {name} {what}; refused",
            image=self.path,
            file=name,
            hint=_DISTRUST,
        )


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stamp(manifest: Manifest, stats: Mapping[str, os.stat_result]) -> dict[str, object]:
    return {
        "id": manifest.id,
        # The manifest as hashed against: a changed manifest voids the stamp.
        "manifest": hashlib.sha256(manifest.to_json().encode()).hexdigest(),
        "files": {name: list(_identity(st)) for name, st in sorted(stats.items())},
    }


def _read_stamp(dir_fd: int, path: Path) -> object:
    """The verification stamp of an image directory (None if there is none or it is not a
    plain small JSON file: then the image is simply hashed again)."""
    try:
        return json.loads(read_regular(dir_fd, VERIFIED_NAME, source=str(path), limit=MAX_STAMP))
    except (OSError, ValueError, RecursionError, ImageError):
        return None


def write_stamp(dir_fd: int, manifest: Manifest, stats: Mapping[str, os.stat_result]) -> None:
    """Record the files' identities (``stats``) as just hashed and found matching
    ``manifest``. Best effort: an image on read-only storage is simply verified in full every
    time."""
    data = json.dumps(_stamp(manifest, stats)).encode()
    with contextlib.suppress(OSError):
        replace_file(dir_fd, VERIFIED_NAME, data, source="image", durable=False)


# -- sealing: a staged directory becomes an image directory ------------------------------------


@dataclass(frozen=True)
class Sealed:
    """What :func:`seal` made: the manifest written, and the key id that signed it (None:
    unsigned)."""

    manifest: Manifest
    signer: str | None


def seal(
    dir_fd: int,
    make_manifest: Callable[[list[FileEntry]], Manifest],
    hashed: Mapping[str, FileEntry] | None = None,
    *,
    source: str,
    sign: bool = True,
    owner: tuple[int, int] | None = None,
) -> Sealed:
    """Turn the staged directory ``dir_fd`` into a complete image directory, not yet renamed
    into place (:func:`publish`, :meth:`Staging.commit`): the one place an image's files are
    hashed, its manifest written and signed, and its verification stamp written.

    Every entry but torpor's bookkeeping files is part of the image (see
    :func:`staged_files`). Every regular file of the directory (CRIU's log and the files made
    here too) is made 0600 (CRIU writes its files 0644: pages hold secrets) and, with
    ``owner``, owned by that ``(uid, gid)``. Files are hashed but those in ``hashed`` (hashed
    while they were written) whose size is unchanged. The manifest ``make_manifest`` returns
    must list exactly the staged files as hashed. If ``sign``, it is signed by this host
    (``torpor.sig``), best effort: if this host's key cannot be made or loaded the image is
    sealed unsigned (its process may already be gone: losing the image would lose it).
    Whatever ``torpor.sig`` the directory held goes.
    """
    files = staged_files(dir_fd, source=source)
    names = list(files)
    # Owner and mode first: changing them changes the files' ctime, which the stamp records.
    # The image's files (refused if one is no longer a regular file), CRIU's log and torpor's
    # other files (what is not a regular file is not part of the image: left alone).
    everything = lstat_entries(dir_fd)
    regular = [n for n, st in sorted(everything.items()) if stat.S_ISREG(st.st_mode)]
    temporary = {n for n in regular if n.startswith(TEMP_PREFIX)}
    give(dir_fd, sorted({*names, *regular} - temporary), owner, source=source)
    for name in sorted(temporary):  # torpor's spares: one may be taken or gone meanwhile
        with contextlib.suppress(FileNotFoundError):
            give(dir_fd, [name], owner, source=source)
    sizes = {n: os.stat(n, dir_fd=dir_fd, follow_symlinks=False).st_size for n in names}
    # A file that changed after it was hashed is hashed again.
    vouched = {n: e for n, e in (hashed or {}).items() if n in sizes and sizes[n] == e.size}
    fresh = {
        e.name: e for e in hash_files(dir_fd, [n for n in names if n not in vouched], source=source)
    }
    entries = [vouched[n] if n in vouched else fresh[n] for n in names]
    manifest = make_manifest(entries)
    if {e.name: e for e in manifest.files} != {e.name: e for e in entries}:
        raise ImageCorruptedError(
            f"the manifest made for {source} does not list the staged files as they were hashed",
            image=source,
            hint="checkpoint again",
        )
    raw = manifest.to_json().encode()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SIGNATURE_NAME, dir_fd=dir_fd)  # not this manifest's
    replace_file(dir_fd, MANIFEST_NAME, raw, source=source)
    signer = _sign(dir_fd, raw, source=source) if sign else None
    stats = {n: os.stat(n, dir_fd=dir_fd, follow_symlinks=False) for n in names}
    write_stamp(dir_fd, manifest, stats)
    if owner is not None:
        made = [MANIFEST_NAME, SIGNATURE_NAME, VERIFIED_NAME]
        present = lstat_entries(dir_fd)
        give(dir_fd, [n for n in made if n in present], owner, source=source)
    return Sealed(manifest, signer)


class Staging:
    """A private staging directory next to ``dest``; :meth:`commit` makes it the image.

    Until committed the directory's name marks it as partial, so a crash mid-dump never
    leaves something that looks like a whole image.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.path = dest.parent / f".{dest.name}{STAGING_MARK}{os.urandom(4).hex()}"

    def create(self) -> Path:
        """Create the staging directory (mode 0700); fail if ``dest`` exists already."""
        check_free(self.dest)
        self.dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.mkdir(mode=0o700)
        return self.path

    def commit(
        self,
        make_manifest: Callable[[list[FileEntry]], Manifest],
        hashed: Mapping[str, FileEntry] | None = None,
        *,
        sign: bool = True,
    ) -> Image:
        """:func:`seal` the staging directory (``hashed``, ``make_manifest`` and ``sign`` as
        there), then :func:`publish` it as ``dest``; return the image."""
        source = str(self.path)
        try:
            dir_fd = open_dir(self.path)
        except FileNotFoundError as exc:
            raise ImageError(f"staging directory {self.path} is gone", image=self.path) from exc
        try:
            sealed = seal(dir_fd, make_manifest, hashed, source=source, sign=sign)
            # The parent as given (it may be reached through a symlink, as when it was made).
            parent_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                publish(
                    parent_fd,
                    self.path.name,
                    self.dest.name,
                    where=self.dest.parent,
                    dir_fd=dir_fd,
                )
            finally:
                os.close(parent_fd)
            dst = os.fstat(dir_fd)
        finally:
            os.close(dir_fd)
        return Image(
            self.dest, sealed.manifest, signer=sealed.signer, dir_id=(dst.st_dev, dst.st_ino)
        )

    def discard(self) -> None:
        """Remove the staging directory and everything in it."""
        shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def staging(dest: Path) -> Iterator[Staging]:
    """Context manager: a created :class:`Staging`, discarded unless committed."""
    st = Staging(dest)
    st.create()
    try:
        yield st
    finally:
        if st.path.exists():
            st.discard()


def check_free(dest: Path) -> None:
    """Raise :class:`AlreadyExistsError` if ``dest`` exists (torpor never overwrites)."""
    if dest.exists() or dest.is_symlink():
        raise AlreadyExistsError(
            f"image directory {dest} exists already",
            path=str(dest),
            hint="choose another -o/--name, or delete the old image first",
        )


def write_manifest(image_dir: Path | int, manifest: Manifest) -> None:
    """Write ``torpor.json`` (0600) durably into the directory ``image_dir`` (a path, or an
    open directory fd), never through a symlink planted there."""
    if isinstance(image_dir, int):
        _write_manifest(image_dir, manifest, source="image")
        return
    fd = open_dir(image_dir)
    try:
        _write_manifest(fd, manifest, source=str(image_dir))
    finally:
        os.close(fd)


def _write_manifest(dir_fd: int, manifest: Manifest, *, source: str) -> None:
    replace_file(dir_fd, MANIFEST_NAME, manifest.to_json().encode(), source=source)
    # A signature of another manifest must not stay beside this one.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SIGNATURE_NAME, dir_fd=dir_fd)


def _sign(dir_fd: int, manifest_bytes: bytes, *, source: str) -> str | None:
    """Write ``torpor.sig`` for ``manifest_bytes``; the signing key id, None if this host has
    no usable key (see :meth:`Staging.commit`)."""
    try:
        key_id, content = _signature.sign(manifest_bytes)
    except (TorporError, OSError):
        return None
    replace_file(dir_fd, SIGNATURE_NAME, content, source=source)
    return key_id
