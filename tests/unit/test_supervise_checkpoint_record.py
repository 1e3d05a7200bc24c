"""A checkpoint whose image was made (published to the series) is recorded as made, with its
image, whatever fails after it: the command's later step, an event write, the prune. That
failure is recorded apart (``step-failed``), never as ``checkpoint-failed``. A checkpoint that
made no image is still ``checkpoint-failed``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from torpor._errors import PoolError
from torpor._pools import MemoryBackend, Pool
from torpor._supervise import _events, _series, _spec, _state
from torpor._supervise._daemon import Supervisor
from torpor._supervise._spec import Spec
from torpor._supervise._state import State

from .test_pool_support import FAST, make_image, random_pages
from .test_supervise_daemon import FakeEnv

IMAGE = "app.s000004"


class CkptJob:
    def __init__(self, code: int, stdout: str = "", error: str = "failed") -> None:
        self.code, self.started, self.stdout, self.error = code, 0.0, stdout, error
        self.fd, w = os.pipe()
        os.close(w)  # readable at once: the command has ended

    def finish(self) -> int:
        os.close(self.fd)
        return self.code

    def error_line(self) -> str:
        return self.error

    def terminate(self) -> None:
        pass


class CkptEnv(FakeEnv):
    """The app runs (its pidfd never readable); its checkpoint command ends as told."""

    def __init__(self, code: int, published: bool, event_fails: str | None = None) -> None:
        super().__init__(["app.s000003"], bad=set())
        self.spec = Spec(name="app", command=("app",), interval=60.0, min_uptime=0.0)
        self.st = State(spec=self.spec, status="supervised")
        self.code, self.published, self.event_fails = code, published, event_fails
        self.tasks: list[list[str]] = []
        self.clock = 10.0

    def now(self) -> float:
        return self.clock

    def checkpoints(self, spec: Spec) -> list[str]:
        return [IMAGE, *self.checkpoints_] if self.published else self.checkpoints_

    def next_image(self, spec: Spec) -> str:
        return IMAGE

    def job(self, args: list[str], what: str) -> CkptJob:  # type: ignore[override]
        self.jobs.append(args)
        out = json.dumps({"image": IMAGE, "duration_s": 1.5}) if self.code == 0 else ""
        job = CkptJob(self.code, out, error="cannot write the spec: disk full")
        job.started = self.clock  # the next period is a minute away
        return job

    def task(self, args: list[str], what: str) -> CkptJob:
        self.tasks.append(args)
        return CkptJob(0, json.dumps({"kept": 3}))

    def event(self, name: str, kind: str, **fields: Any) -> None:
        if kind == self.event_fails:
            raise OSError(28, "No space left on device")
        super().event(name, kind, **fields)


def _checkpoint(env: CkptEnv) -> Supervisor:
    sup = Supervisor(env)  # type: ignore[arg-type]
    sup.reload()
    assert "app" in sup.watches
    env.clock += 60.0  # its first period has passed
    for _ in range(3):
        sup.step(0.01)
    assert env.jobs[0][0] == "checkpoint"
    return sup


def test_a_published_checkpoint_whose_command_then_failed_is_recorded_made() -> None:
    env = CkptEnv(code=1, published=True)
    _checkpoint(env)
    assert [k for k, _ in env.events] == ["checkpoint", "step-failed"]
    assert env.events[0][1]["image"] == IMAGE
    assert env.events[1][1] == {
        "step": "checkpoint",
        "image": IMAGE,
        "error": "cannot write the spec: disk full",
    }
    assert env.st.failed_checkpoints == 0
    assert env.st.last_checkpoint is not None and env.st.last_checkpoint.image == IMAGE


def test_a_checkpoint_that_made_no_image_is_recorded_failed() -> None:
    env = CkptEnv(code=1, published=False)
    _checkpoint(env)
    assert [k for k, _ in env.events] == ["checkpoint-failed"]
    assert env.st.failed_checkpoints == 1 and env.st.last_checkpoint is None


def test_an_event_write_failing_does_not_unrecord_the_checkpoint() -> None:
    env = CkptEnv(code=0, published=True, event_fails="checkpoint")
    _checkpoint(env)
    assert env.st.last_checkpoint is not None and env.st.last_checkpoint.image == IMAGE
    assert env.st.failed_checkpoints == 0
    assert env.tasks == [["prune", "default", "app", "3", "gc"]]  # and it is pruned
    assert env.st.kept == 3


# -- a checkpoint the app took of itself (join_series) ----------------------------------------


def test_an_apps_checkpoint_is_made_when_its_prune_fails(
    torpor_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torpor._pools as pools

    pool = Pool("mem", MemoryBackend(), timing=FAST)
    spec = Spec(name="app", command=("app",), pool="mem", keep=2)
    events: list[tuple[str, dict[str, Any]]] = []
    states: list[State] = [State(spec=spec, status="supervised", kept=1)]

    def failing_prune(*args: Any, **kw: Any) -> None:
        raise PoolError("pool 'mem': delete failed", pool="mem")

    monkeypatch.setattr(_spec, "load", lambda name: spec)
    monkeypatch.setattr(pools, "open_pool", lambda name: pool)
    monkeypatch.setattr(_series, "prune", failing_prune)
    monkeypatch.setattr(_events, "append", lambda name, kind, **f: events.append((kind, f)))
    monkeypatch.setattr(_state, "update", lambda name, fn: states.append(fn(states[-1])))
    image = make_image(tmp_path, "local", bytes(random_pages(16, seed=1)))

    assert _series.join_series("app", image) == "app.s000001@mem"
    assert [k for k, _ in events] == ["checkpoint", "step-failed"]
    assert events[0][1]["image"] == "app.s000001"
    assert events[1][1]["step"] == "prune" and events[1][1]["image"] == "app.s000001"
    last = states[-1].last_checkpoint
    assert last is not None and last.image == "app.s000001"
    assert states[-1].kept == 1  # not known: left as it was
