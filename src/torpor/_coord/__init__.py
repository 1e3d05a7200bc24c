"""Coordinated checkpoint/restore inside a Python process: resources, contexts and hooks told
around a checkpoint, the self-checkpoint call, descriptor checks and policies, built-in fixes for
the standard library, and the external trigger channel (``torpor checkpoint PID``).

The public names are re-exported by :mod:`torpor`; the channel's client side
(:func:`request_checkpoint`, :class:`ExternalOutcome`) is for torpor's CLI.
"""

from ._builtins import configure_builtins as configure_builtins
from ._channel import ExternalOutcome as ExternalOutcome
from ._channel import request_checkpoint as request_checkpoint
from ._checkpoint import CheckpointResult as CheckpointResult
from ._checkpoint import Coordinator as Coordinator
from ._checkpoint import RestoreInfo as RestoreInfo
from ._context import Context as Context
from ._context import Resource as Resource
from ._failures import CheckpointError as CheckpointError
from ._failures import NotCoordinatedError as NotCoordinatedError
from ._failures import RemoteCheckpointError as RemoteCheckpointError
from ._failures import RestoreHookError as RestoreHookError
from ._hold import configure_hold as configure_hold
from ._hold import release_before_hooks as release_before_hooks
from ._hooks import after_restore as after_restore
from ._hooks import before_checkpoint as before_checkpoint
from ._policy import FdPolicyWarning as FdPolicyWarning
from ._policy import FdRule as FdRule
from ._policy import add_fd_rules as add_fd_rules
from ._policy import clear_fd_rules as clear_fd_rules
from ._policy import load_fd_policy as load_fd_policy
from ._runtime import checkpoint as checkpoint
from ._runtime import enable as enable
from ._runtime import global_context as global_context
from ._runtime import restore_info as restore_info
from ._track import enable_from_env as _track_from_env
from ._track import track_fds as track_fds

# Tracking must start before the application opens anything, so TORPOR_TRACK_FDS is read at
# import (it only installs an audit hook); everything else starts on first use.
_track_from_env()

__all__ = [
    "CheckpointError",
    "CheckpointResult",
    "Context",
    "Coordinator",
    "ExternalOutcome",
    "FdPolicyWarning",
    "FdRule",
    "NotCoordinatedError",
    "RemoteCheckpointError",
    "Resource",
    "RestoreHookError",
    "RestoreInfo",
    "add_fd_rules",
    "after_restore",
    "before_checkpoint",
    "checkpoint",
    "clear_fd_rules",
    "configure_builtins",
    "configure_hold",
    "enable",
    "global_context",
    "load_fd_policy",
    "release_before_hooks",
    "request_checkpoint",
    "restore_info",
    "track_fds",
]
