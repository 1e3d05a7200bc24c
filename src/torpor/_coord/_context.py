"""Resources and contexts: who is told about a checkpoint, in which order, and what happens when
some of them fail.

The model is OpenJDK CRaC's ``org.crac``:

- a :class:`Resource` has ``before_checkpoint(context)`` and ``after_restore(context)``; either
  may be a coroutine function (its coroutine is run to completion, see below);
- a :class:`Context` holds resources and is itself a resource, so contexts nest;
- ``before_checkpoint`` runs in reverse registration order, ``after_restore`` in registration
  order, and ``after_restore`` goes exactly to the resources that were told
  ``before_checkpoint`` (even those whose ``before_checkpoint`` failed, as in CRaC), so a
  resource is never half-notified;
- every resource is notified even when others fail; failures are gathered into one
  :class:`CheckpointError` / :class:`RestoreHookError` (``ExceptionGroup`` s), each exception
  with a note naming the resource; a nested context's group is flattened into its parent's;
- :meth:`Context.register` keeps a *weak* reference: registering does not keep an object alive.
  Keep your resource referenced (an attribute of the object it manages is the usual place).

A resource registered while its context is being notified is not part of that notification (it
is neither told ``before_checkpoint`` nor ``after_restore`` this time); the pre-checkpoint
descriptor checks are the safety net for what it holds. Unlike CRaC, registering never blocks.

Coroutines: with no event loop running in the notifying thread, they run on one private event
loop for the whole pass. When the notifying thread is itself running a loop (``checkpoint()``
called synchronously from a coroutine), that loop is blocked by the call, so each coroutine runs
on a fresh loop in a helper thread. Either way, objects bound to *your* loop (an asyncpg pool,
an aiohttp session) cannot be awaited there: trigger the checkpoint off the loop thread
(``await asyncio.to_thread(torpor.checkpoint, ...)``) and, in a plain hook, hand the work to
your loop with ``asyncio.run_coroutine_threadsafe(coro, loop).result()``.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

from .._errors import CoordinationError
from ._failures import CheckpointError, RestoreHookError


@runtime_checkable
class Resource(Protocol):
    """Something that must act around a checkpoint (close a connection, flush a file...).

    Both methods receive the :class:`Context` that notifies them. Either may be ``async def``.
    Raise to report a failure: a failing ``before_checkpoint`` aborts the checkpoint.
    """

    def before_checkpoint(self, context: Context) -> object:
        """Get ready to be checkpointed (runs before the image is written)."""

    def after_restore(self, context: Context) -> object:
        """Come back to life (runs in the restored copy, after an aborted checkpoint, and in
        the original after a ``leave_running`` checkpoint)."""


_local = threading.local()


def in_notification() -> bool:
    """Whether the calling thread is running a checkpoint/restore hook right now."""
    return getattr(_local, "depth", 0) > 0


@contextmanager
def _notifying() -> Iterator[None]:
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


async def _await(awaitable: Any) -> object:
    return await awaitable


class _Pass:
    """One notification pass over a context: calls hooks, gathers failures, runs coroutines."""

    __slots__ = ("_runner", "failures", "phase")

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.failures: list[Exception] = []
        self._runner: asyncio.Runner | None = None

    def call(self, method: Callable[[Context], object], context: Context, who: object) -> None:
        try:
            result = method(context)
            if result is not None and inspect.isawaitable(result):
                self._run(result)
        except (CheckpointError, RestoreHookError) as group:
            # A nested context: its failures already carry notes naming their resources.
            self.failures.extend(group.exceptions)
        except Exception as exc:
            exc.add_note(f"in {_describe(who)}.{self.phase}")
            self.failures.append(exc)

    def _run(self, awaitable: object) -> None:
        coro: Coroutine[Any, Any, object] = (
            awaitable if inspect.iscoroutine(awaitable) else _await(awaitable)
        )
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self._runner is None:
                self._runner = asyncio.Runner()
            # run_until_complete, not Runner.run: the latter installs and removes a SIGINT
            # handler on every call, which costs more than most hooks.
            self._runner.get_loop().run_until_complete(coro)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="torpor-hook") as pool:
            pool.submit(asyncio.run, coro).result()

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()


def _describe(who: object) -> str:
    if isinstance(who, FunctionHook):
        return repr(who)
    if isinstance(who, Context):
        return f"Context({who.name!r})"
    return type(who).__qualname__


class _Strong:
    """A strong reference with the call interface of :class:`weakref.ref`."""

    __slots__ = ("obj",)

    def __init__(self, obj: Resource) -> None:
        self.obj = obj

    def __call__(self) -> Resource:
        return self.obj


class Context:
    """An ordered set of resources, notified as a group; itself a :class:`Resource`.

    Thread-safe: resources may be registered from any thread at any time.
    """

    def __init__(self, name: str = "context") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._refs: dict[int, Callable[[], Resource | None]] = {}
        self._ids: dict[int, int] = {}
        self._next = 0
        self._live_at_prune = 0
        self._notified: list[Resource] | None = None
        self._busy = False

    def __repr__(self) -> str:
        return f"<Context {self.name!r}: {len(self)} resources>"

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for ref in self._refs.values() if ref() is not None)

    def register(self, resource: Resource) -> None:
        """Notify ``resource`` at every checkpoint and restore from now on.

        Holds a weak reference (the resource must support weak references: ``__slots__``
        classes need ``"__weakref__"``). Registering the same object again does nothing.
        """
        # Not isinstance(resource, Resource): a runtime Protocol check costs microseconds.
        if not (hasattr(resource, "before_checkpoint") and hasattr(resource, "after_restore")):
            raise TypeError(
                f"{type(resource).__qualname__} is not a torpor Resource: it needs "
                "before_checkpoint(context) and after_restore(context) methods"
            )
        try:
            ref: Callable[[], Resource | None] = weakref.ref(resource)
        except TypeError as exc:
            raise TypeError(
                f"cannot hold a weak reference to {type(resource).__qualname__}: add "
                '"__weakref__" to its __slots__'
            ) from exc
        self._add(resource, ref)

    def _register_strong(self, resource: Resource) -> None:
        """Register holding a strong reference (function hooks, torpor's own resources)."""
        self._add(resource, _Strong(resource))

    def _add(self, resource: Resource, ref: Callable[[], Resource | None]) -> None:
        with self._lock:
            key = self._ids.get(id(resource))
            if key is not None and key in self._refs and self._refs[key]() is resource:
                return
            key = self._next
            self._next += 1
            self._refs[key] = ref
            self._ids[id(resource)] = key
            # Dead weak references are swept when the table has doubled since the last sweep,
            # which keeps registration amortised O(1) without weakref callbacks.
            if len(self._refs) > 2 * self._live_at_prune + 64:
                self._prune()

    def unregister(self, resource: object) -> bool:
        """Stop notifying ``resource`` (or every function hook wrapping the function
        ``resource``); return whether anything was removed."""
        with self._lock:
            key = self._ids.get(id(resource))
            if key is not None and key in self._refs and self._refs[key]() is resource:
                del self._refs[key]
                del self._ids[id(resource)]
                return True
            doomed = [
                k
                for k, ref in self._refs.items()
                if isinstance(hook := ref(), FunctionHook) and hook.func is resource
            ]
            for k in doomed:
                hook = self._refs.pop(k)()
                self._ids.pop(id(hook), None)
            return bool(doomed)

    def _prune(self) -> None:
        dead = [k for k, ref in self._refs.items() if ref() is None]
        for k in dead:
            del self._refs[k]
        self._ids = {id(r): k for k, ref in self._refs.items() if (r := ref()) is not None}
        self._live_at_prune = len(self._refs)

    def _snapshot(self) -> list[Resource]:
        with self._lock:
            live = [r for ref in self._refs.values() if (r := ref()) is not None]
            if len(live) != len(self._refs):
                self._prune()
            return live

    def before_checkpoint(self, context: Context | None = None) -> None:
        """Tell every resource, newest first; raise :class:`CheckpointError` if any failed.

        Every resource told here (even one that failed) will be told :meth:`after_restore`.
        """
        with self._lock:
            if self._busy or self._notified is not None:
                raise CoordinationError(
                    f"context {self.name!r} is already being checkpointed",
                    hint="a context cannot be registered inside itself",
                )
            self._busy = True
        try:
            resources = self._snapshot()
            notified: list[Resource] = []
            self._notified = notified
            p = _Pass("before_checkpoint")
            try:
                with _notifying():
                    for resource in reversed(resources):
                        notified.append(resource)
                        p.call(resource.before_checkpoint, self, resource)
            finally:
                p.close()
        finally:
            self._busy = False
        if p.failures:
            raise CheckpointError(p.failures)

    def after_restore(self, context: Context | None = None) -> None:
        """Tell the resources that were told ``before_checkpoint``, oldest first; raise
        :class:`RestoreHookError` if any failed. Does nothing if no checkpoint is pending."""
        notified, self._notified = self._notified, None
        if not notified:
            return
        p = _Pass("after_restore")
        try:
            with _notifying():
                for resource in reversed(notified):
                    p.call(resource.after_restore, self, resource)
        finally:
            p.close()
        if p.failures:
            raise RestoreHookError(p.failures)


class FunctionHook:
    """A plain function run at one phase, with the arguments it was registered with.

    ``func(*args, **kwargs)`` is called; it does not receive the context (SnapStart's
    convention). Coroutine functions are awaited.
    """

    __slots__ = ("__weakref__", "args", "func", "kwargs", "phase")

    def __init__(
        self,
        phase: str,
        func: Callable[..., object],
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> None:
        self.phase = phase
        self.func = func
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", None) or repr(self.func)
        return f"{self.phase} hook {name}"

    def before_checkpoint(self, context: Context) -> object:
        """Run the function if it is a before-checkpoint hook."""
        if self.phase == "before_checkpoint":
            return self.func(*self.args, **self.kwargs)
        return None

    def after_restore(self, context: Context) -> object:
        """Run the function if it is an after-restore hook."""
        if self.phase == "after_restore":
            return self.func(*self.args, **self.kwargs)
        return None
