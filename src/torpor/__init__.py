"""torpor: coordinated checkpoint/restore for Linux processes, built for Python applications,
on top of CRIU.

In a Python application (coordination, as OpenJDK CRaC and AWS Lambda SnapStart)::

    import torpor

    @torpor.before_checkpoint
    def close_db(): ...

    @torpor.after_restore
    def reopen_db(): ...

    result = torpor.checkpoint(to="/var/lib/app/warm", leave_running=True)

From outside (what the CLI does): :func:`run`, :func:`checkpoint_process`, :func:`restore`.
Every module is private; this facade is the public API.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING, Any

from ._errors import (
    AlreadyExistsError as AlreadyExistsError,
    CheckpointInProgressError as CheckpointInProgressError,
    CheckpointRefusedError as CheckpointRefusedError,
    CoordinationError as CoordinationError,
    CriuError as CriuError,
    CriuUnavailableError as CriuUnavailableError,
    DumpError as DumpError,
    ImageCorruptedError as ImageCorruptedError,
    ImageError as ImageError,
    ImageNotFoundError as ImageNotFoundError,
    NotFoundError as NotFoundError,
    PermissionDeniedError as PermissionDeniedError,
    PoolConfigError as PoolConfigError,
    PoolError as PoolError,
    ProcessNotFoundError as ProcessNotFoundError,
    RestoreError as RestoreError,
    TorporError as TorporError,
    UsageError as UsageError,
)

if TYPE_CHECKING:
    from ._coord import (
        CheckpointError as CheckpointError,
        CheckpointResult as CheckpointResult,
        Context as Context,
        FdPolicyWarning as FdPolicyWarning,
        FdRule as FdRule,
        NotCoordinatedError as NotCoordinatedError,
        RemoteCheckpointError as RemoteCheckpointError,
        Resource as Resource,
        RestoreHookError as RestoreHookError,
        RestoreInfo as RestoreInfo,
        add_fd_rules as add_fd_rules,
        after_restore as after_restore,
        before_checkpoint as before_checkpoint,
        checkpoint as checkpoint,
        clear_fd_rules as clear_fd_rules,
        configure_builtins as configure_builtins,
        enable as enable,
        global_context as global_context,
        load_fd_policy as load_fd_policy,
        restore_info as restore_info,
        track_fds as track_fds,
    )
    from ._engine import (
        CriuEngine as CriuEngine,
        DumpOptions as DumpOptions,
        RestoreOptions as RestoreOptions,
    )
    from ._images._image import Image as Image
    from ._images._manifest import Manifest as Manifest
    from ._process._dump import checkpoint_pid as checkpoint_process
    from ._process._manage import restore as restore
    from ._process._manage import run as run
    from ._process._registry import ManagedProcess as ManagedProcess

# Everything but the errors is imported on first use: `import torpor` must stay cheap (the CLI
# imports it on every run, and coordination pulls in the standard library's heavier corners).
_LAZY = {
    "CheckpointError": "._coord",
    "CheckpointResult": "._coord",
    "Context": "._coord",
    "FdPolicyWarning": "._coord",
    "FdRule": "._coord",
    "NotCoordinatedError": "._coord",
    "RemoteCheckpointError": "._coord",
    "Resource": "._coord",
    "RestoreHookError": "._coord",
    "RestoreInfo": "._coord",
    "add_fd_rules": "._coord",
    "after_restore": "._coord",
    "before_checkpoint": "._coord",
    "checkpoint": "._coord",
    "clear_fd_rules": "._coord",
    "configure_builtins": "._coord",
    "enable": "._coord",
    "global_context": "._coord",
    "load_fd_policy": "._coord",
    "restore_info": "._coord",
    "track_fds": "._coord",
    "CriuEngine": "._engine",
    "DumpOptions": "._engine",
    "RestoreOptions": "._engine",
    "Image": "._images._image",
    "Manifest": "._images._manifest",
    "checkpoint_process": "._process._dump:checkpoint_pid",
    "restore": "._process._manage",
    "run": "._process._manage",
    "ManagedProcess": "._process._registry",
}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'torpor' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    value = getattr(_importlib.import_module(module_name, __name__), attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError",
    "CheckpointError",
    "CheckpointInProgressError",
    "CheckpointRefusedError",
    "CheckpointResult",
    "Context",
    "CoordinationError",
    "CriuEngine",
    "CriuError",
    "CriuUnavailableError",
    "DumpError",
    "DumpOptions",
    "FdPolicyWarning",
    "FdRule",
    "Image",
    "ImageCorruptedError",
    "ImageError",
    "ImageNotFoundError",
    "ManagedProcess",
    "Manifest",
    "NotCoordinatedError",
    "NotFoundError",
    "PermissionDeniedError",
    "PoolConfigError",
    "PoolError",
    "ProcessNotFoundError",
    "RemoteCheckpointError",
    "Resource",
    "RestoreError",
    "RestoreHookError",
    "RestoreInfo",
    "RestoreOptions",
    "TorporError",
    "UsageError",
    "add_fd_rules",
    "after_restore",
    "before_checkpoint",
    "checkpoint",
    "checkpoint_process",
    "clear_fd_rules",
    "configure_builtins",
    "enable",
    "global_context",
    "load_fd_policy",
    "restore",
    "restore_info",
    "run",
    "track_fds",
]
