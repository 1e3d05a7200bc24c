"""The checkpoint sequence with a fake engine: results, rollback, refusal, recursion, threads."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from torpor._coord import (
    CheckpointError,
    Context,
    Coordinator,
    FdRule,
    RestoreHookError,
)
from torpor._coord._fds import FdInfo
from torpor._errors import CheckpointInProgressError, CheckpointRefusedError, DumpError


@dataclass(frozen=True)
class Outcome:
    restored: bool
    image: Path | None


class FakeEngine:
    """Returns the outcomes it is given, one per call; records its calls."""

    def __init__(self, *outcomes: Outcome | Exception, delay: float = 0) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[Path, bool, bool, str | None, dict[str, str]]] = []
        self.delay = delay

    def __call__(
        self,
        dest: Path,
        *,
        leave_running: bool,
        tcp_established: bool,
        name: str | None,
        labels: Mapping[str, str],
    ) -> Outcome:
        self.calls.append((dest, leave_running, tcp_established, name, dict(labels)))
        time.sleep(self.delay)
        out = self.outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out


class Rec:
    def __init__(self, name: str, log: list[str], fail: str = "") -> None:
        self.name, self.log, self.fail = name, log, fail

    def before_checkpoint(self, context: Context) -> None:
        self.log.append(f"b:{self.name}")
        if self.fail == "before":
            raise RuntimeError(f"{self.name} refuses")

    def after_restore(self, context: Context) -> None:
        self.log.append(f"a:{self.name}")
        if self.fail == "after":
            raise RuntimeError(f"{self.name} broke")


def no_fds() -> list[FdInfo]:
    return []


def make(
    *outcomes: Outcome | Exception, log: list[str], keep: list[Rec], delay: float = 0
) -> tuple[Coordinator, FakeEngine]:
    ctx = Context("test")
    for r in keep:
        ctx.register(r)
    engine = FakeEngine(*outcomes, delay=delay)
    return Coordinator(engine, ctx, scan=no_fds), engine


def test_restored_copy_gets_a_result_and_restore_info(tmp_path: Path) -> None:
    log: list[str] = []
    keep = [Rec("db", log), Rec("log", log)]
    c, engine = make(Outcome(True, tmp_path / "img"), log=log, keep=keep)
    assert not c.restore_info().restored
    result = c.checkpoint(tmp_path / "img", name="n", labels={"k": "v"})
    assert result.restored and result.restore_count == 1 and result.image == tmp_path / "img"
    assert result.restored_at is not None and result.restored_at >= result.checkpointed_at
    assert engine.calls == [(tmp_path / "img", False, False, "n", {"k": "v"})]
    assert log == ["b:log", "b:db", "a:db", "a:log"]
    info = c.restore_info()
    assert info.restored and info.restore_count == 1
    assert info.uptime_since_restore is not None and info.uptime_since_restore >= 0
    assert info.monotonic_jump is not None and abs(info.monotonic_jump) < 1


def test_leave_running_original_runs_after_restore_too(tmp_path: Path) -> None:
    log: list[str] = []
    keep = [Rec("x", log)]
    c, engine = make(Outcome(False, tmp_path), Outcome(True, tmp_path), log=log, keep=keep)
    first = c.checkpoint(tmp_path, leave_running=True, tcp_established=True)
    assert not first.restored and first.restore_count == 0
    assert engine.calls[0][1:3] == (True, True)
    assert log == ["b:x", "a:x"]
    assert c.checkpoint(tmp_path).restore_count == 1


def test_failing_hook_aborts_without_dump_and_rolls_back(tmp_path: Path) -> None:
    log: list[str] = []
    keep = [Rec("a", log), Rec("b", log, fail="before"), Rec("c", log)]
    c, engine = make(Outcome(True, tmp_path), log=log, keep=keep)
    with pytest.raises(CheckpointError) as info:
        c.checkpoint(tmp_path)
    assert engine.calls == []
    assert [str(e) for e in info.value.exceptions] == ["b refuses"]
    assert log == ["b:c", "b:b", "b:a", "a:a", "a:b", "a:c"]
    # The app is as it was: the next checkpoint works.
    log.clear()
    keep[1].fail = ""
    assert c.checkpoint(tmp_path).restored


def test_rollback_failures_join_the_group(tmp_path: Path) -> None:
    log: list[str] = []
    keep = [Rec("a", log, fail="after"), Rec("b", log, fail="before")]
    c, _ = make(log=log, keep=keep)
    with pytest.raises(CheckpointError) as info:
        c.checkpoint(tmp_path)
    msgs = [str(e) for e in info.value.exceptions]
    assert msgs == ["b refuses", "a broke"]
    assert "while rolling back the failed checkpoint" in info.value.exceptions[1].__notes__


def test_dump_error_rolls_back_and_propagates(tmp_path: Path) -> None:
    log: list[str] = []
    keep = [Rec("a", log)]
    c, _ = make(DumpError("criu said no"), log=log, keep=keep)
    with pytest.raises(DumpError):
        c.checkpoint(tmp_path)
    assert log == ["b:a", "a:a"]


def test_after_restore_failures_raise_with_the_result(tmp_path: Path) -> None:
    log: list[str] = []
    keep = [Rec("a", log, fail="after"), Rec("b", log)]
    c, _ = make(Outcome(True, tmp_path), log=log, keep=keep)
    with pytest.raises(RestoreHookError) as info:
        c.checkpoint(tmp_path)
    result = info.value.result
    assert getattr(result, "restored", None) is True
    assert log == ["b:b", "b:a", "a:a", "a:b"]
    assert c.restore_info().restore_count == 1


def test_refused_descriptors_abort_with_one_line_each(tmp_path: Path) -> None:
    log: list[str] = []
    keep = [Rec("a", log)]
    w = open(tmp_path / "data.bin", "w")  # noqa: SIM115 - held open on purpose
    r, wp = os.pipe()
    try:
        ctx = Context()
        ctx.register(keep[0])
        engine = FakeEngine(Outcome(True, tmp_path))
        from torpor._coord._fds import scan

        def mine() -> list[FdInfo]:
            return [i for i in scan() if i.fd in (w.fileno(), r)]

        c = Coordinator(engine, ctx, scan=mine)
        with pytest.raises(CheckpointRefusedError) as info:
            c.checkpoint(tmp_path / "img")
        assert engine.calls == []
        assert log == ["b:a", "a:a"]
        (line,) = info.value.offenders
        assert line.startswith(
            f"fd {w.fileno()}: file {tmp_path / 'data.bin'}, w: open for writing"
        )
        # A policy turns the refusal into a close (with a warning) and the dump proceeds.
        rule = FdRule(type="file", path=str(tmp_path / "*.bin"), action="close")
        with pytest.warns(UserWarning, match="close"):
            assert c.checkpoint(tmp_path / "img", fd_rules=[rule]).restored
        assert os.readlink(f"/proc/self/fd/{w.fileno()}") == os.devnull
    finally:
        w.close()
        os.close(r)
        os.close(wp)


def test_checkpoint_from_inside_a_hook_is_refused(tmp_path: Path) -> None:
    seen: list[BaseException] = []
    c: Coordinator

    class Recursive:
        def before_checkpoint(self, context: Context) -> None:
            try:
                c.checkpoint(tmp_path)
            except CheckpointInProgressError as exc:
                seen.append(exc)

        def after_restore(self, context: Context) -> None: ...

    ctx = Context()
    r = Recursive()
    ctx.register(r)
    c = Coordinator(FakeEngine(Outcome(True, tmp_path)), ctx, scan=no_fds)
    c.checkpoint(tmp_path)
    assert len(seen) == 1 and "inside a checkpoint/restore hook" in str(seen[0])


def test_concurrent_requests_are_serialised(tmp_path: Path) -> None:
    active = 0
    most = 0
    lock = threading.Lock()

    class Counting:
        def before_checkpoint(self, context: Context) -> None:
            nonlocal active, most
            with lock:
                active += 1
                most = max(most, active)

        def after_restore(self, context: Context) -> None:
            nonlocal active
            with lock:
                active -= 1

    ctx = Context()
    r = Counting()
    ctx.register(r)
    engine = FakeEngine(*[Outcome(True, tmp_path)] * 6, delay=0.01)
    c = Coordinator(engine, ctx, scan=no_fds)
    errors: list[BaseException] = []

    def go() -> None:
        try:
            c.checkpoint(tmp_path)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert most == 1
    assert c.restore_info().restore_count == 6


def test_restore_info_works_inside_after_restore_hooks(tmp_path: Path) -> None:
    seen: list[int] = []
    c: Coordinator

    class Reporter:
        def before_checkpoint(self, context: Context) -> None: ...

        def after_restore(self, context: Context) -> None:
            seen.append(c.restore_info().restore_count)

    ctx = Context()
    r = Reporter()
    ctx.register(r)
    c = Coordinator(FakeEngine(Outcome(True, tmp_path)), ctx, scan=no_fds)
    c.checkpoint(tmp_path)
    assert seen == [1]
