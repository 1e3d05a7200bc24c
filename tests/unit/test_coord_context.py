"""Resources, contexts and function hooks: order, failure gathering, weak references, async."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator

import pytest

import snapshot_restore_py
import torpor._coord as coord
from torpor._coord import CheckpointError, Context, RestoreHookError
from torpor._coord._runtime import global_context
from torpor._errors import CoordinationError, TorporError


class Rec:
    """A resource that records its notifications in a shared log."""

    def __init__(self, name: str, log: list[str], *, fail: str = "") -> None:
        self.name = name
        self.log = log
        self.fail = fail

    def before_checkpoint(self, context: Context) -> None:
        self.log.append(f"b:{self.name}")
        if self.fail == "before":
            raise ValueError(f"{self.name} cannot checkpoint")

    def after_restore(self, context: Context) -> None:
        self.log.append(f"a:{self.name}")
        if self.fail == "after":
            raise ConnectionError(f"{self.name} cannot reconnect")


def test_before_in_reverse_after_in_registration_order() -> None:
    log: list[str] = []
    ctx = Context()
    rs = [Rec(str(i), log) for i in range(4)]
    for r in rs:
        ctx.register(r)
    ctx.before_checkpoint()
    ctx.after_restore()
    assert log == ["b:3", "b:2", "b:1", "b:0", "a:0", "a:1", "a:2", "a:3"]


def test_contexts_nest_and_keep_their_place() -> None:
    log: list[str] = []
    outer, inner = Context("outer"), Context("inner")
    a, b, c = Rec("a", log), Rec("b", log), Rec("c", log)
    outer.register(a)
    outer.register(inner)
    inner.register(b)
    outer.register(c)
    outer.before_checkpoint()
    outer.after_restore()
    assert log == ["b:c", "b:b", "b:a", "a:a", "a:b", "a:c"]


def test_every_resource_is_notified_and_failures_are_gathered() -> None:
    log: list[str] = []
    ctx = Context()
    keep = [
        Rec("0", log),
        Rec("1", log, fail="before"),
        Rec("2", log),
        Rec("3", log, fail="before"),
    ]
    for r in keep:
        ctx.register(r)
    with pytest.raises(CheckpointError) as info:
        ctx.before_checkpoint()
    err = info.value
    assert isinstance(err, TorporError) and isinstance(err, ExceptionGroup)
    assert log == ["b:3", "b:2", "b:1", "b:0"]
    assert [str(e) for e in err.exceptions] == ["3 cannot checkpoint", "1 cannot checkpoint"]
    assert err.exceptions[0].__notes__ == ["in Rec.before_checkpoint"]
    assert "2 hooks failed before checkpoint" in str(err)
    # Every resource told before_checkpoint (the failed ones too, as in CRaC) hears after_restore.
    ctx.after_restore()
    assert log[4:] == ["a:0", "a:1", "a:2", "a:3"]


def test_restore_failures_are_gathered_and_except_star_works() -> None:
    log: list[str] = []
    ctx = Context()
    keep = [Rec("0", log, fail="after"), Rec("1", log)]
    for r in keep:
        ctx.register(r)
    ctx.before_checkpoint()
    caught = []
    try:
        ctx.after_restore()
    except* ConnectionError as group:
        caught.append(group)
    assert log[-2:] == ["a:0", "a:1"]
    assert isinstance(caught[0], RestoreHookError)


def test_nested_failures_are_flattened() -> None:
    log: list[str] = []
    outer, inner = Context("outer"), Context("inner")
    keep = [Rec("x", log, fail="before"), Rec("y", log, fail="before")]
    outer.register(keep[0])
    outer.register(inner)
    inner.register(keep[1])
    with pytest.raises(CheckpointError) as info:
        outer.before_checkpoint()
    assert len(info.value.exceptions) == 2
    assert all(not isinstance(e, ExceptionGroup) for e in info.value.exceptions)


def test_registration_is_weak() -> None:
    log: list[str] = []
    ctx = Context()
    ctx.register(Rec("gone", log))
    kept = Rec("kept", log)
    ctx.register(kept)
    gc.collect()
    assert len(ctx) == 1
    ctx.before_checkpoint()
    ctx.after_restore()
    assert log == ["b:kept", "a:kept"]


def test_many_dead_registrations_are_swept() -> None:
    ctx = Context()
    for i in range(1000):
        ctx.register(Rec(str(i), []))
    assert len(ctx._refs) < 200


def test_duplicate_registration_and_unregister() -> None:
    log: list[str] = []
    ctx = Context()
    r = Rec("r", log)
    ctx.register(r)
    ctx.register(r)
    assert len(ctx) == 1
    assert ctx.unregister(r)
    assert not ctx.unregister(r)
    ctx.before_checkpoint()
    assert log == []


def test_non_resources_and_unweakrefable_objects_are_refused() -> None:
    class Slotted:
        __slots__ = ()

        def before_checkpoint(self, context: Context) -> None: ...

        def after_restore(self, context: Context) -> None: ...

    with pytest.raises(TypeError, match="not a torpor Resource"):
        Context().register(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="__weakref__"):
        Context().register(Slotted())


def test_a_context_inside_itself_is_refused() -> None:
    ctx = Context("loop")
    ctx._register_strong(ctx)
    with pytest.raises(CheckpointError) as info:
        ctx.before_checkpoint()
    assert isinstance(info.value.exceptions[0], CoordinationError)


def test_resource_registered_during_notification_waits_for_next_time() -> None:
    log: list[str] = []
    ctx = Context()
    late = Rec("late", log)

    class Registrar:
        def before_checkpoint(self, context: Context) -> None:
            context.register(late)

        def after_restore(self, context: Context) -> None: ...

    registrar = Registrar()
    ctx.register(registrar)
    ctx.before_checkpoint()
    ctx.after_restore()
    assert log == []
    ctx.before_checkpoint()
    ctx.after_restore()
    assert log == ["b:late", "a:late"]


def test_async_methods_are_awaited() -> None:
    log: list[str] = []

    class Async:
        async def before_checkpoint(self, context: Context) -> None:
            await asyncio.sleep(0)
            log.append("b")

        async def after_restore(self, context: Context) -> None:
            await asyncio.sleep(0)
            log.append("a")

    ctx = Context()
    r = Async()
    ctx.register(r)
    ctx.before_checkpoint()
    ctx.after_restore()
    assert log == ["b", "a"]


def test_async_failures_are_gathered() -> None:
    class Bad:
        async def before_checkpoint(self, context: Context) -> None:
            raise OSError("async boom")

        def after_restore(self, context: Context) -> None: ...

    ctx = Context()
    r = Bad()
    ctx.register(r)
    with pytest.raises(CheckpointError) as info:
        ctx.before_checkpoint()
    assert str(info.value.exceptions[0]) == "async boom"


def test_async_hooks_from_inside_a_running_loop_run_on_a_helper_thread() -> None:
    seen: list[int] = []

    class Async:
        async def before_checkpoint(self, context: Context) -> None:
            seen.append(threading.get_ident())

        def after_restore(self, context: Context) -> None: ...

    ctx = Context()
    r = Async()
    ctx.register(r)

    async def main() -> int:
        ctx.before_checkpoint()
        ctx.after_restore()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert seen and seen[0] != loop_thread


@pytest.fixture
def hooks() -> Iterator[list[str]]:
    """A log for function hooks; every hook registered in the test is removed after it."""
    log: list[str] = []
    before = set(global_context()._refs)
    yield log
    with global_context()._lock:
        for key in set(global_context()._refs) - before:
            del global_context()._refs[key]


def _notify() -> None:
    ctx = global_context()
    ctx.before_checkpoint()
    ctx.after_restore()


def test_decorator_forms(hooks: list[str]) -> None:
    @coord.before_checkpoint
    def bare() -> None:
        hooks.append("bare")

    @coord.after_restore("x", n=2)
    def with_args(tag: str, n: int) -> None:
        hooks.append(f"{tag}{n}")

    def plain(tag: str) -> None:
        hooks.append(tag)

    assert coord.before_checkpoint(plain, "call") is plain
    assert bare() is None and hooks == ["bare"]
    hooks.clear()
    _notify()
    assert hooks == ["call", "bare", "x2"]


def test_function_hooks_are_held_strongly_and_can_be_unregistered(hooks: list[str]) -> None:
    coord.after_restore(lambda: hooks.append("lambda"))
    gc.collect()
    _notify()
    assert hooks == ["lambda"]

    def f() -> None:
        hooks.append("f")

    coord.before_checkpoint(f)
    coord.after_restore(f)
    assert global_context().unregister(f)
    hooks.clear()
    _notify()
    assert hooks == ["lambda"]


def test_async_function_hooks(hooks: list[str]) -> None:
    @coord.after_restore
    async def reconnect() -> None:
        await asyncio.sleep(0)
        hooks.append("reconnected")

    _notify()
    assert hooks == ["reconnected"]


def test_snapstart_api_runs_with_snapstart_order(hooks: list[str]) -> None:
    @snapshot_restore_py.register_before_snapshot
    def one() -> None:
        hooks.append("before-1")

    def two(x: int, **kw: str) -> None:
        hooks.append(f"{x}-{kw}")

    snapshot_restore_py.register_before_snapshot(two, 1)
    snapshot_restore_py.register_after_restore(two, 2, arg1="Lambda")

    @snapshot_restore_py.register_after_restore
    def three() -> None:
        hooks.append("after-3")

    assert one() is None
    hooks.clear()
    assert snapshot_restore_py.get_before_snapshot()[-2:] == [(one, (), {}), (two, (1,), {})]
    assert snapshot_restore_py.get_after_restore()[-2][1:] == ((2,), {"arg1": "Lambda"})
    _notify()
    assert hooks == ["1-{}", "before-1", "2-{'arg1': 'Lambda'}", "after-3"]
    with pytest.raises(TypeError):
        snapshot_restore_py.register_before_snapshot(42)  # type: ignore[arg-type, type-var]
