# ruff: noqa: E501 - whole messages are asserted, each on one line
"""Supervision records: written atomically (0600), updated under the name's lock without losing
a concurrent change, read as hostile with one-line errors naming the file and the field."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from torpor import NotFoundError, TorporError, UnsafePathError
from torpor._supervise import _state
from torpor._supervise._spec import Spec, SupervisionRecordError
from torpor._supervise._state import Crash, LastCheckpoint, State

SPEC = Spec("app", ("sleep", "100"), interval=1.0)
FULL = State(
    SPEC,
    "given-up",
    restores=3,
    kept=2,
    last_crash=Crash("2026-01-01T00:00:00.000Z", 9, None, 1.5),
    last_checkpoint=LastCheckpoint("app.s000004", "2026-01-01T00:00:01.000Z", 0.25, 12.5, 4096),
    given_up="5 restarts within 5m",
    failed_checkpoints=1,
)


def test_save_read_round_trip(torpor_home: Path) -> None:
    _state.save(FULL)
    assert _state.read("app") == FULL
    path = torpor_home / "supervised" / "app.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_read_absent_creates_nothing(torpor_home: Path) -> None:
    assert _state.read("app") is None
    assert _state.list_all() == []
    _state.remove("app")
    assert not (torpor_home / "supervised").exists()


def test_update(torpor_home: Path) -> None:
    _state.save(State(SPEC, "supervised"))
    new = _state.update("app", lambda s: s.evolve(restores=s.restores + 1, status="stopped"))
    assert new == State(SPEC, "stopped", restores=1)
    assert _state.read("app") == new


def test_update_of_unsupervised(torpor_home: Path) -> None:
    with pytest.raises(NotFoundError) as info:
        _state.update("app", lambda s: s)
    assert str(info.value) == "'app' is not supervised — `torpor supervise app` supervises it"


def _bump(home: str, n: int) -> None:
    os.environ["TORPOR_HOME"] = home
    for _ in range(n):
        _state.update("app", lambda s: s.evolve(restores=s.restores + 1))


def test_concurrent_updates_lose_nothing(torpor_home: Path) -> None:
    _state.save(State(SPEC, "supervised"))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_bump, args=(str(torpor_home), 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    state = _state.read("app")
    assert state is not None and state.restores == 100


def test_remove_and_list(torpor_home: Path) -> None:
    _state.save(State(SPEC, "supervised"))
    _state.save(State(Spec("b", ("x",)), "stopped"))
    assert [s.name for s in _state.list_all()] == ["app", "b"]
    _state.remove("app")
    assert [s.name for s in _state.list_all()] == ["b"]


def _plant(home: Path, data: object, name: str = "app") -> Path:
    d = home / "supervised"
    d.mkdir(mode=0o700, exist_ok=True)
    path = d / f"{name}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    path.chmod(0o600)
    return path


def _refusal(home: Path, data: object) -> str:
    path = _plant(home, data)
    with pytest.raises(TorporError) as info:
        _state.read("app")
    return str(info.value).replace(str(path), "F")


GOOD = FULL.to_json()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"status": "zombie"},
            "supervision record F has a bad status ('zombie'); refused — torpor did not write it: remove F",
        ),
        (
            {"restores": -1},
            "supervision record F has a bad restores (-1); refused — torpor did not write it: remove F",
        ),
        (
            {"kept": "2"},
            "supervision record F has a bad kept ('2'); refused — torpor did not write it: remove F",
        ),
        (
            {"given_up": 5},
            "supervision record F has a bad given_up (5); refused — torpor did not write it: remove F",
        ),
        (
            {"last_crash": {**GOOD["last_crash"], "signal": 0}},
            "supervision record F has a bad last_crash.signal (0); refused — torpor did not write it: remove F",
        ),
        (
            {"last_crash": {**GOOD["last_crash"], "time": "yesterday"}},
            "supervision record F has a bad last_crash.time ('yesterday'); refused — torpor did not write it: remove F",
        ),
        (
            {"last_crash": [1]},
            "supervision record F has a bad last_crash ([1]); refused — torpor did not write it: remove F",
        ),
        (
            {"last_checkpoint": {**GOOD["last_checkpoint"], "image": "../x"}},
            "supervision record F has a bad last_checkpoint.image ('../x'); refused — torpor did not write it: remove F",
        ),
        (
            {"last_checkpoint": {**GOOD["last_checkpoint"], "duration_s": None}},
            "supervision record F lacks last_checkpoint.duration_s; refused — torpor did not write it: remove F",
        ),
        (
            {"last_checkpoint": {**GOOD["last_checkpoint"], "new_bytes": -5}},
            "supervision record F has a bad last_checkpoint.new_bytes (-5); refused — torpor did not write it: remove F",
        ),
        (
            {"spec": {**GOOD["spec"], "name": "other"}},
            "supervision record F is the record of another process ('other'); refused — torpor did not write it: remove F",
        ),
        (
            {"spec": {**GOOD["spec"], "keep": 0}},
            "supervision spec in F has a bad keep: 0 is not within 1-10000; refused — torpor did not write it: remove it, then `torpor supervise NAME` again",
        ),
        (
            {"spec": None},
            "supervision spec in F is not a JSON object (NoneType); refused — torpor did not write it: remove it, then `torpor supervise NAME` again",
        ),
    ],
)
def test_read_refuses_bad_fields(
    torpor_home: Path, changes: dict[str, object], message: str
) -> None:
    assert _refusal(torpor_home, {**GOOD, **changes}) == message


def test_read_refuses_bad_files(torpor_home: Path) -> None:
    assert (
        _refusal(torpor_home, "{x")
        == "supervision record F is not JSON; refused — torpor did not write it: remove F"
    )
    assert (
        _refusal(torpor_home, {"status": "supervised"})
        == "supervision record F lacks spec; refused — torpor did not write it: remove F"
    )
    path = _plant(torpor_home, GOOD)
    path.chmod(0o620)
    with pytest.raises(UnsafePathError) as info:
        _state.read("app")
    assert (
        str(info.value)
        == f"supervision record {path} is writable by group or others (mode 0620); refused — torpor did not write it: remove {path}"
    )
    path.unlink()
    (torpor_home / "elsewhere.json").write_text(json.dumps(GOOD))
    path.symlink_to(torpor_home / "elsewhere.json")
    with pytest.raises(UnsafePathError) as info:
        _state.read("app")
    assert (
        str(info.value)
        == f"supervision record {path} is a symlink; refused — torpor did not write it: remove {path}"
    )


def test_list_all_skips_and_reports(torpor_home: Path) -> None:
    _state.save(State(SPEC, "supervised"))
    _plant(torpor_home, "garbage", name="bad")
    skipped: list[TorporError] = []
    assert [s.name for s in _state.list_all(skipped)] == ["app"]
    assert [type(e) for e in skipped] == [SupervisionRecordError]


def test_control_characters_in_reason_are_replaced(torpor_home: Path) -> None:
    _plant(torpor_home, {**GOOD, "given_up": "bad\x1b[2Jthing"})
    state = _state.read("app")
    assert state is not None and state.given_up == "bad?[2Jthing"


def test_planted_lock_symlink_is_refused(torpor_home: Path) -> None:
    _state.save(State(SPEC, "supervised"))
    lock = torpor_home / "supervised" / "app.lock"
    lock.unlink()
    target = torpor_home / "target"
    target.write_text("")
    lock.symlink_to(target)
    with pytest.raises(UnsafePathError):
        _state.update("app", lambda s: s)
