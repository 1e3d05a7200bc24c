"""AWS Lambda SnapStart's runtime-hook API, run by torpor.

Code written for SnapStart works unchanged::

    from snapshot_restore_py import register_after_restore, register_before_snapshot

    @register_before_snapshot
    def close_connections(): ...

    register_after_restore(reconnect, "primary", retries=3)

The semantics are SnapStart's: ``register_*(func, *args, **kwargs)`` records
``func(*args, **kwargs)`` and returns ``func`` unchanged, so it also works as a bare decorator;
references are strong; before-snapshot hooks run in reverse registration order, after-restore
hooks in registration order. ``get_before_snapshot()``/``get_after_restore()`` list the
registrations as ``(func, args, kwargs)`` tuples.

The hooks are torpor function hooks in torpor's global context, so they run at every
``torpor.checkpoint()`` and ``torpor checkpoint PID`` and interleave with torpor's own hooks by
registration order. One difference from Lambda: a failing hook does not stop the others; torpor
runs them all and raises ``torpor.CheckpointError`` (no snapshot is taken) or
``torpor.RestoreHookError`` with every failure.

As Lambda runs no invocation before the after-restore hooks finished, torpor runs none of the
application's other threads before them: they are held from the snapshot until the hooks ran
(see ``torpor._coord._hold``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from torpor._coord._hooks import register_function

__all__ = [
    "get_after_restore",
    "get_before_snapshot",
    "register_after_restore",
    "register_before_snapshot",
]

F = TypeVar("F", bound=Callable[..., Any])
Registration = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]

_lock = threading.Lock()
_before: list[Registration] = []
_after: list[Registration] = []


def _register(
    phase: str, table: list[Registration], func: F, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> F:
    if not callable(func):
        raise TypeError(f"{func!r} is not callable: register a function (and its arguments)")
    with _lock:
        register_function(phase, func, *args, **kwargs)
        table.append((func, args, kwargs))
    return func


def register_before_snapshot(func: F, *args: Any, **kwargs: Any) -> F:
    """Run ``func(*args, **kwargs)`` before every checkpoint (newest registration first).

    Returns ``func``, so ``@register_before_snapshot`` works as a decorator.
    """
    return _register("before_checkpoint", _before, func, args, kwargs)


def register_after_restore(func: F, *args: Any, **kwargs: Any) -> F:
    """Run ``func(*args, **kwargs)`` after every restore (oldest registration first).

    Returns ``func``, so ``@register_after_restore`` works as a decorator.
    """
    return _register("after_restore", _after, func, args, kwargs)


def get_before_snapshot() -> list[Registration]:
    """The before-snapshot registrations, ``(func, args, kwargs)``, in registration order."""
    with _lock:
        return list(_before)


def get_after_restore() -> list[Registration]:
    """The after-restore registrations, ``(func, args, kwargs)``, in registration order."""
    with _lock:
        return list(_after)
