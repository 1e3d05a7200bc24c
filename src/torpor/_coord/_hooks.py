"""Function hooks: ``@torpor.before_checkpoint`` and ``@torpor.after_restore``.

They follow AWS Lambda SnapStart's ``snapshot_restore_py``: the function is held strongly (a
decorated module-level function has nobody else to keep it alive), it is called with the
arguments given at registration, and the decorated function is returned unchanged. Hooks land in
the global context with the resources, so the one order rule holds across both: before-checkpoint
newest first, after-restore oldest first.

Three forms::

    @torpor.before_checkpoint                       # bare
    def close_pool(): ...

    @torpor.after_restore("primary", retries=3)     # called with the hook's arguments
    def reconnect(which, retries): ...

    torpor.after_restore(reconnect, "replica")      # SnapStart's register(func, *args, **kw)

The call form is told apart from the decorator form by its first argument: when it is callable
it is the hook. To bind a callable as a hook's first argument, use the third form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from ._context import FunctionHook
from ._runtime import global_context

F = TypeVar("F", bound=Callable[..., Any])


def register_function(
    phase: str, func: Callable[..., object], *args: object, **kwargs: object
) -> None:
    """Register ``func(*args, **kwargs)`` to run at ``phase`` in the global context."""
    global_context()._register_strong(FunctionHook(phase, func, args, kwargs))


def _hook_decorator(phase: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args and callable(args[0]):
        register_function(phase, args[0], *args[1:], **kwargs)
        return args[0]

    def decorate(func: F) -> F:
        register_function(phase, func, *args, **kwargs)
        return func

    return decorate


@overload
def before_checkpoint(func: F, /) -> F: ...
@overload
def before_checkpoint(func: Callable[..., object], /, *args: Any, **kwargs: Any) -> Any: ...
@overload
def before_checkpoint(*args: Any, **kwargs: Any) -> Callable[[F], F]: ...
def before_checkpoint(*args: Any, **kwargs: Any) -> Any:
    """Run a function before every checkpoint (newest registration first).

    Usable bare (``@before_checkpoint``), called with the hook's arguments
    (``@before_checkpoint(1, x=2)``), or as ``before_checkpoint(func, *args, **kwargs)``.
    Returns the function unchanged. ``async def`` functions are awaited.
    """
    return _hook_decorator("before_checkpoint", args, kwargs)


@overload
def after_restore(func: F, /) -> F: ...
@overload
def after_restore(func: Callable[..., object], /, *args: Any, **kwargs: Any) -> Any: ...
@overload
def after_restore(*args: Any, **kwargs: Any) -> Callable[[F], F]: ...
def after_restore(*args: Any, **kwargs: Any) -> Any:
    """Run a function after every restore (oldest registration first), after an aborted
    checkpoint, and in the original after a ``leave_running`` checkpoint.

    Same forms as :func:`before_checkpoint`.
    """
    return _hook_decorator("after_restore", args, kwargs)
