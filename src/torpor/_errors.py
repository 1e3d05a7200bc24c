"""torpor's exceptions: one root, a small tree, structured fields.

::

    TorporError                      every error torpor raises on purpose
    ├── UsageError                   bad input from the user (a name, a key=value, a flag)
    ├── NotFoundError                a process, image, pool or chunk that does not exist
    │   ├── ProcessNotFoundError     no such pid / managed name (carries ``pid``)
    │   └── ImageNotFoundError       no such image (carries ``image``)
    ├── AlreadyExistsError           a target that exists already (image dir, pool, name)
    ├── PermissionDeniedError        not root / not the owner of the process
    │   └── UnsafePathError          a path owned by another user, writable by others, a symlink
    ├── CriuError                    CRIU refused or failed (pid, image, log path, log lines)
    │   ├── CriuUnavailableError     no usable CRIU >= 4.2 on this machine
    │   ├── DumpError                a dump failed: the process keeps running
    │   └── RestoreError             a restore failed: nothing was left running
    ├── ImageError                   an image that cannot be used
    │   ├── ImageCorruptedError      a bad checksum, a missing/truncated file (``file``)
    │   │   └── UnsafeImageError     a bad file name, a symlink/device/FIFO, an unlisted file
    │   └── SignatureError           unsigned, or signed by a key that is not trusted
    ├── PoolError                    a storage pool or its backend failed
    │   └── PoolConfigError          an unknown key or a bad value (carries ``key``)
    └── CoordinationError            the in-process coordination protocol failed
        ├── CheckpointRefusedError   pre-checkpoint checks found blocking descriptors
        └── CheckpointInProgressError  a checkpoint requested from inside a hook

The hook failure groups (``CheckpointError``/``RestoreHookError``) are ``ExceptionGroup``s and
live in the coordination module; they also derive from :class:`TorporError`.

Every error has a one-line ``str()``: what failed and, where we know it, what to do next.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class TorporError(Exception):
    """Root of every error torpor raises on purpose.

    ``hint`` is the next step for the user, appended to the message after `` — ``.
    """

    def __init__(self, msg: str, *, hint: str | None = None) -> None:
        self.msg = msg
        self.hint = hint
        super().__init__(msg)

    def __str__(self) -> str:
        return f"{self.msg} — {self.hint}" if self.hint else self.msg


class UsageError(TorporError):
    """Bad input: a malformed name, argument or option."""


class NotFoundError(TorporError):
    """Something the user named does not exist."""


class ProcessNotFoundError(NotFoundError):
    """No process with this pid (or managed name)."""

    def __init__(self, msg: str, *, pid: int | None = None, hint: str | None = None) -> None:
        super().__init__(msg, hint=hint)
        self.pid = pid


class ImageNotFoundError(NotFoundError):
    """No image with this name or path."""

    def __init__(self, msg: str, *, image: str | None = None, hint: str | None = None) -> None:
        super().__init__(msg, hint=hint)
        self.image = image


class AlreadyExistsError(TorporError):
    """The target exists already; torpor never overwrites what the user has."""

    def __init__(self, msg: str, *, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(msg, hint=hint)
        self.path = path


class PermissionDeniedError(TorporError):
    """The caller may not do this (not root, not the owner)."""


class UnsafePathError(PermissionDeniedError):
    """A path torpor will not use as root: owned by another user, writable by group or others,
    or a symlink where a directory or file was expected (ssh's StrictModes). ``path`` names it.
    """

    def __init__(self, msg: str, *, path: str | Path | None = None, hint: str | None = None):
        super().__init__(msg, hint=hint)
        self.path = str(path) if path is not None else None


class CriuError(TorporError):
    """CRIU refused or failed.

    ``log_lines`` are the real error lines from CRIU's log (never the harmless rlimit line),
    ``log_path`` where the full log is.
    """

    def __init__(
        self,
        msg: str,
        *,
        pid: int | None = None,
        image: str | Path | None = None,
        log_path: str | Path | None = None,
        log_lines: Sequence[str] = (),
        hint: str | None = None,
    ) -> None:
        super().__init__(msg, hint=hint)
        self.pid = pid
        self.image = str(image) if image is not None else None
        self.log_path = str(log_path) if log_path is not None else None
        self.log_lines = tuple(log_lines)

    @property
    def first_error(self) -> str | None:
        """The first real error line of CRIU's log, if any."""
        return self.log_lines[0] if self.log_lines else None


class CriuUnavailableError(CriuError):
    """No usable CRIU (>= 4.2, passing ``criu check``) on this machine."""


class DumpError(CriuError):
    """A checkpoint failed; the process was left running."""


class RestoreError(CriuError):
    """A restore failed; nothing it started was left running."""


class ImageError(TorporError):
    """An image that cannot be used as it is."""

    def __init__(self, msg: str, *, image: str | Path | None = None, hint: str | None = None):
        super().__init__(msg, hint=hint)
        self.image = str(image) if image is not None else None


class ImageCorruptedError(ImageError):
    """A file (or chunk) of an image does not match its recorded size or SHA-256."""

    def __init__(
        self,
        msg: str,
        *,
        image: str | Path | None = None,
        file: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(msg, image=image, hint=hint)
        self.file = file


class UnsafeImageError(ImageCorruptedError):
    """An image (or archive, or pool record) holding something torpor refuses to act on: a file
    name that is not a plain name, a symlink, device or FIFO, a file its manifest does not list
    (or a listed one that is missing). ``file`` names it."""


class SignatureError(ImageError):
    """An image whose manifest is unsigned, badly signed, or signed by a key not trusted here."""


class PoolError(TorporError):
    """A storage pool or its backend failed."""

    def __init__(self, msg: str, *, pool: str | None = None, hint: str | None = None) -> None:
        super().__init__(msg, hint=hint)
        self.pool = pool


class PoolConfigError(PoolError):
    """A pool's configuration has an unknown key or a bad value."""

    def __init__(
        self, msg: str, *, pool: str | None = None, key: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(msg, pool=pool, hint=hint)
        self.key = key


class CoordinationError(TorporError):
    """The in-process checkpoint coordination failed."""


class CheckpointRefusedError(CoordinationError):
    """Pre-checkpoint checks found descriptors that would break restore or leak state.

    ``offenders`` holds one line per descriptor (fd, type, path or addresses, and where it was
    opened when tracking is on).
    """

    def __init__(self, msg: str, *, offenders: Sequence[str] = (), hint: str | None = None):
        super().__init__(msg, hint=hint)
        self.offenders = tuple(offenders)


class CheckpointInProgressError(CoordinationError):
    """A checkpoint was requested from inside a checkpoint/restore hook."""
