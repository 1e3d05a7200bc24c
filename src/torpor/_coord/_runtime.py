"""Starting coordination in this process, and the entry points that start it on first use:
``global_context()``, ``checkpoint()``, ``restore_info()``.

Nothing runs at import. The first use of the coordination API (a registration, a hook
decorator, ``checkpoint()``, ``restore_info()``, or :func:`enable`) installs the built-in
resources and starts the channel, so a process that merely imports torpor (the CLI, tools) never
listens. ``TORPOR_CHANNEL=0`` keeps the channel off.

This module is the top of the coordination package: it uses the contexts
(:mod:`._contexts`), the built-ins, the channel and the coordinator, and none of them uses it
(the channel's listener runs checkpoints through the coordinator directly: it only listens
once :func:`enable` ran).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping

from . import _builtins, _channel, _policy
from ._checkpoint import CheckpointResult, RestoreInfo, default_coordinator
from ._context import Context
from ._contexts import application_context, system_context

_started = False
_start_lock = threading.Lock()


def global_context() -> Context:
    """The application's context: register resources here (``Core.getGlobalContext()``).

    Starts torpor's coordination in this process on first use (see :func:`enable`).
    """
    if not _started:
        enable()
    return application_context()


def enable() -> None:
    """Start coordination in this process: install the built-in resources and, unless
    ``TORPOR_CHANNEL=0``, listen for ``torpor checkpoint PID``. Idempotent and cheap.
    """
    global _started
    if _started:
        return
    with _start_lock:
        if _started:
            return
        _builtins.install(system_context())
        _started = True
        if _channel.channel_wanted():
            _channel.start_listener()


def checkpoint(
    to: str | os.PathLike[str] | None = None,
    *,
    leave_running: bool = False,
    tcp_established: bool = False,
    name: str | None = None,
    labels: Mapping[str, str] | None = None,
    fd_rules: Iterable[_policy.FdRule] = (),
) -> CheckpointResult:
    """Checkpoint this process into the image directory ``to``, coordinated (without ``to``:
    a temporary directory, or, in a supervised process, its series in its pool only).

    Runs the before-checkpoint hooks, checks the descriptors (``fd_rules`` first, then the
    process-wide rules), trims memory and dumps. Without ``leave_running`` the original ends
    here and only restored copies return; with it, the original returns too
    (``result.restored`` tells them apart). See :class:`~torpor.Coordinator` for the errors.
    """
    enable()
    return default_coordinator().checkpoint(
        to,
        leave_running=leave_running,
        tcp_established=tcp_established,
        name=name,
        labels=labels,
        fd_rules=fd_rules,
    )


def restore_info() -> RestoreInfo:
    """Was this process restored: when, how many times, how long ago (see
    :class:`~torpor.RestoreInfo`)."""
    enable()
    return default_coordinator().restore_info()
