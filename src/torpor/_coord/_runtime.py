"""The process-wide coordination state: the global context, torpor's own resources, and the
lazy start of the external trigger channel.

Two contexts sit under one root that the checkpoint notifies:

- the *system* context holds torpor's own resources (the built-in stdlib fixes and the trigger
  channel's listener); it is registered first, so it is told ``before_checkpoint`` last (after
  the application closed what it holds) and ``after_restore`` first (random is reseeded and the
  channel listens again before any application hook runs);
- the *global* context (:func:`global_context`) holds the application's resources.

Between them sits the hold's stage marker: after restore, threads the application marked with
``release_before_hooks`` go on once torpor's own resources are back; the others stay held until
the application's hooks ran too (see :mod:`._hold`).

Nothing runs at import. The first use of the coordination API (a registration, a hook
decorator, ``checkpoint()``, ``restore_info()``, or :func:`enable`) installs the built-in
resources and starts the channel, so a process that merely imports torpor (the CLI, tools) never
listens. ``TORPOR_CHANNEL=0`` keeps the channel off.
"""

from __future__ import annotations

import os
import threading

from ._context import Context
from ._hold import HoldStage

_root = Context("torpor")
_system = Context("torpor.system")
_global = Context("global")
_root._register_strong(_system)
# Between the two: after restore, threads marked release_before_hooks go on here.
_root._register_strong(HoldStage())
_root._register_strong(_global)

_started = False
_start_lock = threading.Lock()


def root_context() -> Context:
    """The context the checkpoint notifies: torpor's own resources, then the application's."""
    return _root


def system_context() -> Context:
    """torpor's own resources (built-ins, the channel listener)."""
    return _system


def global_context() -> Context:
    """The application's context: register resources here (``Core.getGlobalContext()``).

    Starts torpor's coordination in this process on first use (see :func:`enable`).
    """
    if not _started:
        enable()
    return _global


def channel_wanted() -> bool:
    """Whether the external trigger channel may run (``TORPOR_CHANNEL`` is not ``0``)."""
    return os.environ.get("TORPOR_CHANNEL", "1").strip().lower() not in ("0", "off", "no", "false")


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
        from . import _builtins, _channel

        _builtins.install(_system)
        _started = True
        if channel_wanted():
            _channel.start_listener()
