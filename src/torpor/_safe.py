"""The one boundary for names and files that come from outside (images, manifests, pool
records, archives, the home): torpor runs as root, so every such byte is hostile until checked.

- :func:`check_name`: a file name from an image, manifest, record or archive is a *plain* name:
  not empty, no ``/``, not ``.`` or ``..``, no NUL or control characters, at most
  :data:`MAX_NAME` bytes. Checked here and nowhere else.
- Files are opened relative to a directory fd with ``O_NOFOLLOW`` (:func:`open_dir`,
  :func:`open_regular`, :func:`create_file`), must be regular files (``fstat``: no symlinks,
  devices or FIFOs; a FIFO is opened ``O_NONBLOCK`` so it cannot hang us) and are created
  ``O_EXCL`` with mode 0600.
- :func:`check_private`: a directory torpor acts on as root (its home and subdirectories, an
  image directory, a dir pool's source) must be owned by the effective user or root and not
  writable by group or others, as ssh's StrictModes requires of ``~/.ssh``;
  :func:`check_ancestors`: so must every directory on the way to it (sticky ones aside),
  or whoever can write to a parent could swap it between a check and a use by path.
- Whole small files: :func:`read_regular` reads one with a size bound (a planted huge file
  cannot exhaust memory); :func:`replace_file` writes one whole or not at all (an ``O_EXCL``
  temporary file renamed over the name: a symlink planted there is replaced, never followed).

Everything here sits on the bottom floor: it imports nothing of torpor's but the errors.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._errors import UnsafeImageError, UnsafePathError

MAX_NAME = 255
# Temporary files of :func:`replace_file`; a crash may leave one behind, so directories that
# hold them treat the prefix as theirs.
TEMP_PREFIX = ".torpor-tmp-"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_name(name: object, *, source: str, what: str = "file name") -> str:
    """Return ``name`` if it is a plain file name, else raise :class:`UnsafeImageError`
    naming ``source`` (the image, record or archive it came from)."""
    if not isinstance(name, str):
        raise UnsafeImageError(
            f"{source}: {what} {name!r} is not a string", image=source, file=repr(name)
        )
    problem = _name_problem(name)
    if problem is not None:
        raise UnsafeImageError(
            f"{source}: {what} {name!r} {problem}; refused",
            image=source,
            file=name,
            hint="the image was made or changed by something other than torpor: do not use it",
        )
    return name


def _name_problem(name: str) -> str | None:
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is a directory reference"
    if "/" in name or "\\" in name:
        return "is a path, not a plain name"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "holds control characters"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if len(encoded) > MAX_NAME:
        return f"is longer than {MAX_NAME} bytes"
    return None


def is_plain_name(name: object) -> bool:
    """Whether ``name`` would pass :func:`check_name`."""
    return isinstance(name, str) and _name_problem(name) is None


# -- directories --------------------------------------------------------------------------------


def open_dir(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> int:
    """Open a directory (``O_NOFOLLOW``: a symlink in its last component is refused)."""
    try:
        return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(
                f"{path} is not a directory (a symlink or a file); refused",
                path=str(path),
                hint=f"remove {path} or point torpor at a real directory",
            ) from exc
        raise


@contextmanager
def opened_dir(path: str | os.PathLike[str]) -> Iterator[int]:
    """Context manager around :func:`open_dir`."""
    fd = open_dir(path)
    try:
        yield fd
    finally:
        os.close(fd)


def check_private(
    path: str | os.PathLike[str], *, what: str = "directory", fd: int | None = None
) -> os.stat_result:
    """Refuse a directory that another user could change under root: it must be a real
    directory (not a symlink), owned by the effective user or root, and not writable by group
    or others. Returns its ``stat``. ``fd`` (an open fd of it) is checked instead of the path
    when given, so the check and the use are of the same directory."""
    p = Path(path)
    st = os.fstat(fd) if fd is not None else os.lstat(p)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(
            f"{what} {p} is not a directory (a symlink or a file); refused",
            path=p,
            hint=f"remove {p}, or point torpor at a real directory",
        )
    euid = os.geteuid()
    owner = owner_problem(st)
    if owner is not None:
        raise UnsafePathError(
            f"{what} {p} {owner}; refused",
            path=p,
            hint=f"chown {euid} {p}",
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(
            f"{what} {p} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'}"
            f" (mode {stat.S_IMODE(st.st_mode):04o}); refused",
            path=p,
            hint=f"chmod go-w {p}",
        )
    return st


# -- files ------------------------------------------------------------------------------------


def open_regular(dir_fd: int, name: str, *, source: str) -> int:
    """Open the plain-named regular file ``name`` in ``dir_fd`` for reading.

    A symlink, device, FIFO, socket or directory is refused with :class:`UnsafeImageError`
    (never followed, never read: a FIFO or ``/dev/zero`` would hang or never end).
    """
    check_name(name, source=source)
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _not_regular(source, name, "a symlink") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(source, name, _kind(st.st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_file(dir_fd: int, name: str, *, source: str, mode: int = 0o600) -> int:
    """Create the plain-named file ``name`` in ``dir_fd`` for writing: ``O_EXCL`` (an existing
    file or a planted symlink is never written through), mode 0600."""
    check_name(name, source=source)
    return os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )


def lstat_entries(dir_fd: int) -> dict[str, os.stat_result]:
    """Every entry of the directory ``dir_fd`` and its ``lstat`` (symlinks not followed); one
    removed while it is listed is not there."""
    out: dict[str, os.stat_result] = {}
    with os.scandir(dir_fd) as it:
        for entry in it:
            with contextlib.suppress(FileNotFoundError):
                out[entry.name] = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
    return out


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def kind_problem(mode: int) -> str | None:
    """None for a regular file, else what it is instead (``a symlink``, ``a device`` …)."""
    return None if stat.S_ISREG(mode) else _kind(mode)


def _not_regular(source: str, name: str, kind: str) -> UnsafeImageError:
    return UnsafeImageError(
        f"{source}: file {name} is {kind}, not a regular file; refused",
        image=source,
        file=name,
        hint="an image holds only regular files: do not use this one",
    )


# -- whole small files --------------------------------------------------------------------------


def read_regular(dir_fd: int, name: str, *, source: str, limit: int) -> bytes:
    """The content of the plain-named regular file ``name`` in ``dir_fd`` (see
    :func:`open_regular`), refused with :class:`UnsafeImageError` if it is larger than
    ``limit`` bytes: a planted huge file must not exhaust memory. ``FileNotFoundError`` if
    there is none."""
    fd = open_regular(dir_fd, name, source=source)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise _too_large(source, name, size, limit)
        chunks: list[bytes] = []
        total = 0
        # Read to the end rather than trust the size: the file may grow while read.
        while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise _too_large(source, name, total, limit)
    finally:
        os.close(fd)
    return b"".join(chunks)


def replace_file(dir_fd: int, name: str, data: bytes, *, source: str, durable: bool = True) -> None:
    """Write ``data`` to the plain-named file ``name`` in ``dir_fd`` whole or not at all: into
    a fresh temporary file (:data:`TEMP_PREFIX`, created with :func:`create_file`: never through
    a planted symlink), then renamed over ``name`` (a symlink or file there is replaced, never
    followed). ``durable`` fsyncs the file and the directory."""
    check_name(name, source=source)
    tmp = f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    fd = _claim_spare(dir_fd, tmp, len(data))
    if fd is None:
        fd = create_file(dir_fd, tmp, source=source)
    try:
        try:
            view, offset = memoryview(data), 0
            while offset < len(data):
                offset += os.pwrite(fd, view[offset:], offset)
            os.ftruncate(fd, len(data))  # a spare's allocation beyond the data is given back
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    if durable:
        os.fsync(dir_fd)


# Space set aside in a directory before a step that may fill its disk (a checkpoint reserves it
# before CRIU runs): replace_file writes into a spare's blocks, already allocated, so a disk
# that filled meanwhile (or fills while we write) cannot refuse the write. Freeing the space
# first and then writing would race any other writer for it.
SPARE_PREFIX = TEMP_PREFIX + "spare-"


def reserve_spares(dir_fd: int, sizes: list[int], *, source: str) -> None:
    """Allocate one spare file (:data:`SPARE_PREFIX`) of each size in ``dir_fd`` (``ENOSPC``
    if the disk has not got them)."""
    for i, size in enumerate(sizes):
        fd = create_file(dir_fd, f"{SPARE_PREFIX}{i}", source=source)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)


def drop_spares(dir_fd: int) -> None:
    """Remove the spares left in ``dir_fd`` (best effort)."""
    with contextlib.suppress(OSError), os.scandir(dir_fd) as it:
        names = [e.name for e in it if e.name.startswith(SPARE_PREFIX)]
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)


def _claim_spare(dir_fd: int, tmp: str, size: int) -> int | None:
    """Rename the smallest spare of ``dir_fd`` that holds ``size`` bytes (else the largest) to
    ``tmp`` and open it for writing; None if there is none. A spare is ours only if it is a
    private regular file with one link."""
    try:
        spares = {n: st for n, st in lstat_entries(dir_fd).items() if n.startswith(SPARE_PREFIX)}
    except OSError:
        return None
    fitting = sorted((st.st_blocks * 512, n) for n, st in spares.items())
    if not fitting:
        return None
    big_enough = [(room, n) for room, n in fitting if room >= size]
    _, name = big_enough[0] if big_enough else fitting[-1]
    try:
        os.rename(name, tmp, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or owner_problem(st) is not None:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        return None
    os.fchmod(fd, 0o600)
    return fd


def _too_large(source: str, name: str, size: int, limit: int) -> UnsafeImageError:
    return UnsafeImageError(
        f"{source}: file {name} has {size} bytes or more, over the {limit} this file may have;"
        " refused",
        image=source,
        file=name,
        hint="the image was made or changed by something other than torpor: do not use it",
    )


def owner_problem(st: os.stat_result) -> str | None:
    """None if ``st`` is owned by the effective user or root, else what is wrong, as a phrase
    (``is owned by uid N, not by root``): the one wording of every ownership refusal."""
    euid = os.geteuid()
    if st.st_uid in (euid, 0):
        return None
    return f"is owned by uid {st.st_uid}, not by {'root' if euid == 0 else f'uid {euid} or root'}"


# -- the way to a directory -----------------------------------------------------------------------

_MAX_LINKS = 40  # as the kernel's MAXSYMLINKS


def check_ancestors(
    path: str | os.PathLike[str],
    *,
    what: str = "directory",
    shown: str | os.PathLike[str] | None = None,
) -> None:
    """Refuse ``path`` (:class:`UnsafePathError`) if another user could change which directory
    it names: every directory on the way to it (symlinks followed, as the kernel does) must be
    owned by the effective user or root and not writable by group or others, as ssh's
    StrictModes requires of a home's parents. A directory others may write to is allowed if it
    is sticky (``/tmp``): others cannot rename or remove entries there that they do not own,
    so the entry on the way (or a symlink there) must then be owned by the effective user or
    root. The last component itself is the caller's to check (:func:`check_private`), and
    need not exist. A refusal names ``shown`` (default ``path``): a directory yet to be made
    below ``path``, whose way is checked before it is made.

    Without this, whoever can write to a parent can swap the directory (or a symlink on the
    way) between torpor's checks of it and a later use by path, CRIU's included.
    """
    path_shown = path if shown is None else shown
    # Not normalised: after a symlink, ".." is the parent of where the link led.
    p = Path(path) if os.path.isabs(path) else Path.cwd() / path
    parts = list(p.parts[1:])
    if parts and parts[-1] != "..":
        parts.pop()  # the directory itself: the caller's to check
    todo = parts[::-1]  # a stack: the next component last
    current = Path("/")
    here = os.lstat(current)
    _check_way(path_shown, what, current, here)
    links = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent  # a real directory's parent, checked on the way down
            here = os.lstat(current)
            continue
        nxt = current / name
        st = os.lstat(nxt)
        owner = owner_problem(st)
        if here.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and owner is not None:
            # In a sticky directory others may write to, its owner may rename or replace it.
            raise _unsafe_way(
                path,
                what,
                nxt,
                f"{owner}, in {current}, which others may write to",
                hint=f"chown -h {os.geteuid()} {nxt}, or use a directory only its owner can change",
            )
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise _unsafe_way(path_shown, what, nxt, "leads through too many symlinks")
            target = Path(os.readlink(nxt))
            if target.is_absolute():
                current, here = Path("/"), os.lstat("/")
            todo.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise _unsafe_way(path_shown, what, nxt, "is not a directory")
        _check_way(path_shown, what, nxt, st)
        current, here = nxt, st


def _check_way(path: str | os.PathLike[str], what: str, d: Path, st: os.stat_result) -> None:
    owner = owner_problem(st)
    if owner is not None:
        raise _unsafe_way(path, what, d, owner, hint=f"chown {os.geteuid()} {d}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        who = "others" if st.st_mode & stat.S_IWOTH else "its group"
        raise _unsafe_way(
            path, what, d, f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
        )


def _unsafe_way(
    path: str | os.PathLike[str], what: str, d: Path, problem: str, *, hint: str | None = None
) -> UnsafePathError:
    return UnsafePathError(
        f"{what} {path} is refused: {d} on the way to it {problem}",
        path=d,
        hint=hint or f"chmod go-w {d}, or use a directory only its owner can change",
    )


def private_file_problem(st: os.stat_result) -> str | None:
    """None if ``st`` is a regular file torpor could have written (owned by the effective user
    or root, not writable by group or others), else what is wrong, as a phrase."""
    kind = kind_problem(st.st_mode)
    if kind is not None:
        return f"is {kind}, not a regular file"
    owner = owner_problem(st)
    if owner is not None:
        return owner
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {st.st_mode & 0o777:04o})"
    return None
