"""Where torpor keeps its state: one home directory, laid out here and nowhere else.

``TORPOR_HOME`` overrides the default (``/var/lib/torpor`` for root, else
``$XDG_DATA_HOME/torpor``). Everything is created readable by its owner only: images hold a
process's memory, secrets included.

torpor acts on what it finds here as root (records name processes it signals, logs and images
are written into it), so the home and each of its directories are checked every time they are
handed out, as ssh's StrictModes checks ``~/.ssh``: a real directory (not a symlink), owned by
the effective user or root, not writable by group or others (:func:`torpor._safe.check_private`,
one ``lstat`` each). So must be every directory on the way to the home (sticky ones such as
``/tmp`` aside, where the entry must be ours): whoever can write to a parent could otherwise
swap the home between a check and a use. A missing one is created 0700; an existing one that
fails is refused with the fix, never silently ``chmod``-ed (someone else may have prepared it).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from . import _safe
from ._errors import PermissionDeniedError, UnsafePathError


def home() -> Path:
    """The torpor home directory (created 0700 on first use; refused if another user could
    change it, or any directory on the way to it: see the module docstring)."""
    return private_dir(home_path(), what="torpor home", ancestors=True)


def home_path() -> Path:
    """Where the torpor home is, unchecked (for messages and for ``torpor doctor``)."""
    env = os.environ.get("TORPOR_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/torpor")
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "torpor"


def private_dir(path: Path, *, what: str = "directory", ancestors: bool = False) -> Path:
    """Return ``path``, a directory only its owner can change: created 0700 (parents 0755 less
    the umask) if missing, refused (:class:`~torpor.UnsafePathError`, or
    :class:`~torpor.PermissionDeniedError` when it is root's and we are not) otherwise. With
    ``ancestors``, every directory on the way to it must be one only its owner can change too
    (:func:`torpor._safe.check_ancestors`); the way to what is missing is checked before
    anything is made, whether or not ``ancestors`` is asked for (see :func:`_create`)."""
    try:
        try:
            st = _safe.check_private(path, what=what)
        except FileNotFoundError:
            _create(path, what)
            st = _safe.check_private(path, what=what)
        if ancestors:
            _safe.check_ancestors(path, what=what)
    except OSError as exc:
        raise _unusable(path, what, exc) from exc
    euid = os.geteuid()
    if euid != 0 and st.st_uid != euid:
        # Safe (root's), but not ours to write: say so rather than fail later on EACCES.
        raise PermissionDeniedError(
            f"{what} {path} belongs to root; uid {euid} cannot use it",
            hint="run torpor as root, or set TORPOR_HOME to a directory of your own",
        )
    return path


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _create(path: Path, what: str) -> None:
    """Make ``path`` and whatever is missing on the way to it, never by path: the way to the
    nearest directory that exists is checked first (:func:`torpor._safe.check_ancestors`: no
    other user can change it, so it names one directory from then on), then each missing level
    is made with ``mkdir`` relative to its parent's fd, opened ``O_NOFOLLOW`` relative to it,
    checked to be the directory just made, and its mode set through that fd. A ``chmod`` by
    path would follow a symlink swapped in meanwhile: whoever can write to a parent could make
    root change the mode of any file. A level someone else made meanwhile is left as it is
    (the home itself is then checked by the caller as any existing one)."""
    missing: list[str] = []
    existing = path
    while True:
        try:
            os.stat(existing)
            break
        except FileNotFoundError:
            if existing.name in ("", ".", "..") or existing.parent == existing:
                raise
            missing.append(existing.name)
            existing = existing.parent
    if not missing:
        return  # made meanwhile: the caller checks it as any existing one
    missing.reverse()
    _safe.check_ancestors(existing / missing[0], what=what, shown=path)
    fd = os.open(existing, _DIR_FLAGS)
    try:
        _check_level(path, what, existing, os.fstat(fd))
        level = existing
        for i, name in enumerate(missing):
            last = i == len(missing) - 1
            level = level / name
            # 0755 less the umask is never writable by others (the home's parents are checked
            # too); the home itself is 0700 whatever the umask.
            mode = 0o700 if last else 0o755
            try:
                os.mkdir(name, mode, dir_fd=fd)
                made = True
            except FileExistsError:
                if last:
                    return  # made meanwhile by someone else: the caller checks it
                made = False
            sub = _open_level(path, what, level, name, fd)
            os.close(fd)
            fd = sub
            st = os.fstat(fd)
            if not made:
                _check_level(path, what, level, st)
                continue
            if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & ~mode & 0o777:
                raise _unsafe(path, what, level, "is not the directory torpor just made there")
            # We made it, so its mode is ours to set (the umask may have taken owner bits
            # away): through its fd, never by path.
            if last and stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _open_level(path: Path, what: str, level: Path, name: str, parent_fd: int) -> int:
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _unsafe(path, what, level, "is not a directory (a symlink or a file)") from exc
        raise


def _check_level(path: Path, what: str, level: Path, st: os.stat_result) -> None:
    """A directory on the way to ``path`` that torpor did not make: owned by the effective
    user or root, not writable by others unless sticky (as :func:`torpor._safe.check_ancestors`
    requires)."""
    owner = _safe.owner_problem(st)
    if owner is not None:
        raise _unsafe(path, what, level, owner, hint=f"chown {os.geteuid()} {level}")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        who = "others" if st.st_mode & stat.S_IWOTH else "its group"
        raise _unsafe(
            path,
            what,
            level,
            f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})",
            hint=f"chmod go-w {level}, or use a directory only its owner can change",
        )


def _unsafe(
    path: Path, what: str, level: Path, problem: str, *, hint: str | None = None
) -> UnsafePathError:
    return UnsafePathError(
        f"{what} {path} is refused: {level} on the way to it {problem}",
        path=level,
        hint=hint
        or f"{level} was replaced while torpor made it: check who can write to {level.parent}",
    )


def _unusable(path: Path, what: str, exc: OSError) -> PermissionDeniedError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDeniedError(
            f"cannot use {what} {path}: permission denied (uid {os.geteuid()})",
            hint="run torpor as root, or set TORPOR_HOME to a directory of your own",
        )
    return PermissionDeniedError(
        f"cannot use {what} {path}: {exc.strerror or exc}",
        hint="set TORPOR_HOME to a directory of your own",
    )


def read_home_file(name: str, *, limit: int = 1 << 20) -> bytes | None:
    """The bytes of the file ``name`` in the home (a cache, a record of torpor's own), or None
    if there is none or it is not one torpor could have written: not a regular file (a
    symlink is never followed), owned by another user, writable by group or others, or longer
    than ``limit``."""
    home_fd = _safe.open_dir(home())
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=home_fd
        )
    except OSError:
        return None
    finally:
        os.close(home_fd)
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid not in (os.geteuid(), 0)
            or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        ):
            return None
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= limit else None


def write_home_file(name: str, data: bytes) -> None:
    """Replace the file ``name`` in the home atomically with ``data``: a new 0600 file
    (``O_EXCL``, ``O_NOFOLLOW``: a planted file or symlink is never written through) renamed
    over the old one."""
    home_fd = _safe.open_dir(home())
    try:
        _safe.replace_file(home_fd, name, data, source="torpor home", durable=False)
    finally:
        os.close(home_fd)


def fsync_dir(path: Path) -> None:
    """Make a rename (or a creation) in the directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _subdir(name: str, what: str) -> Path:
    return private_dir(home() / name, what=what)


MIGRATE_UNDO = "migrate-undo"  # <home>/migrate-undo: journals of what migrations must undo


def images_dir() -> Path:
    """Local image directories (``torpor checkpoint`` without ``-o`` or ``--pool``)."""
    return _subdir("images", "images directory")


def procs_dir() -> Path:
    """Records of managed processes (``torpor run`` / ``torpor restore``)."""
    return _subdir("procs", "records directory")


def logs_dir() -> Path:
    """CRIU logs and the stdout/stderr logs of managed processes."""
    return _subdir("logs", "logs directory")


def pools_dir() -> Path:
    """Pool configurations and the ``default`` dir pool's data."""
    return _subdir("pools", "pools directory")


def cache_dir() -> Path:
    """Images materialised from pools for restore."""
    return _subdir("cache", "cache directory")


def supervised_dir() -> Path:
    """Supervision specs and state of supervised processes, and the supervisor's lock."""
    return _subdir("supervised", "supervision directory")


def events_dir() -> Path:
    """Event logs of supervised processes (``torpor events``)."""
    return _subdir("events", "events directory")
