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
)
from ._errors import (
    CheckpointInProgressError as CheckpointInProgressError,
)
from ._errors import (
    CheckpointRefusedError as CheckpointRefusedError,
)
from ._errors import (
    CoordinationError as CoordinationError,
)
from ._errors import (
    CriuError as CriuError,
)
from ._errors import (
    CriuUnavailableError as CriuUnavailableError,
)
from ._errors import (
    DumpError as DumpError,
)
from ._errors import (
    ImageCorruptedError as ImageCorruptedError,
)
from ._errors import (
    ImageError as ImageError,
)
from ._errors import (
    ImageNotFoundError as ImageNotFoundError,
)
from ._errors import (
    NotFoundError as NotFoundError,
)
from ._errors import (
    PermissionDeniedError as PermissionDeniedError,
)
from ._errors import (
    PoolConfigError as PoolConfigError,
)
from ._errors import (
    PoolError as PoolError,
)
from ._errors import (
    ProcessNotFoundError as ProcessNotFoundError,
)
from ._errors import (
    RestoreError as RestoreError,
)
from ._errors import (
    SignatureError as SignatureError,
)
from ._errors import (
    TorporError as TorporError,
)
from ._errors import (
    UnsafeImageError as UnsafeImageError,
)
from ._errors import (
    UnsafePathError as UnsafePathError,
)
from ._errors import (
    UsageError as UsageError,
)

if TYPE_CHECKING:
    from ._coord import (
        CheckpointError as CheckpointError,
    )
    from ._coord import (
        CheckpointResult as CheckpointResult,
    )
    from ._coord import (
        Context as Context,
    )
    from ._coord import (
        FdPolicyWarning as FdPolicyWarning,
    )
    from ._coord import (
        FdRule as FdRule,
    )
    from ._coord import (
        NotCoordinatedError as NotCoordinatedError,
    )
    from ._coord import (
        RemoteCheckpointError as RemoteCheckpointError,
    )
    from ._coord import (
        Resource as Resource,
    )
    from ._coord import (
        RestoreHookError as RestoreHookError,
    )
    from ._coord import (
        RestoreInfo as RestoreInfo,
    )
    from ._coord import (
        add_fd_rules as add_fd_rules,
    )
    from ._coord import (
        after_restore as after_restore,
    )
    from ._coord import (
        before_checkpoint as before_checkpoint,
    )
    from ._coord import (
        checkpoint as checkpoint,
    )
    from ._coord import (
        clear_fd_rules as clear_fd_rules,
    )
    from ._coord import (
        configure_builtins as configure_builtins,
    )
    from ._coord import (
        configure_hold as configure_hold,
    )
    from ._coord import (
        enable as enable,
    )
    from ._coord import (
        global_context as global_context,
    )
    from ._coord import (
        load_fd_policy as load_fd_policy,
    )
    from ._coord import (
        release_before_hooks as release_before_hooks,
    )
    from ._coord import (
        restore_info as restore_info,
    )
    from ._coord import (
        track_fds as track_fds,
    )
    from ._engine import (
        CriuEngine as CriuEngine,
    )
    from ._engine import (
        DumpOptions as DumpOptions,
    )
    from ._engine import (
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
    "configure_hold": "._coord",
    "release_before_hooks": "._coord",
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
    "SignatureError",
    "TorporError",
    "UnsafeImageError",
    "UnsafePathError",
    "UsageError",
    "add_fd_rules",
    "after_restore",
    "before_checkpoint",
    "checkpoint",
    "checkpoint_process",
    "clear_fd_rules",
    "configure_builtins",
    "configure_hold",
    "enable",
    "global_context",
    "load_fd_policy",
    "release_before_hooks",
    "restore",
    "restore_info",
    "run",
    "track_fds",
]
