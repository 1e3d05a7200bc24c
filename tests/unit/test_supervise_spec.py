"""The supervision spec: durations as users write them, every field checked when made and when
read from hostile JSON (one line naming the source and the field), and load(), the cheap read
of the commit paths that never fails a checkpoint."""

# ruff: noqa: E501 - whole messages are asserted, each on one line
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from torpor import TorporError, UsageError
from torpor._supervise import _spec
from torpor._supervise._spec import Spec, SupervisionRecordError, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5), ("0", 0.0),
     ("0s", 0.0), ("720h", 30 * 86400.0)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1s", "invalid duration '-1s' — write a number and a unit: 500ms, 10s, 1.5s, 5m, 1h (or 0)"),
        ("10", "invalid duration '10': no unit — write 10s"),
        ("abc", "invalid duration 'abc' — write a number and a unit: 500ms, 10s, 1.5s, 5m, 1h (or 0)"),
        ("721h", "invalid duration '721h': longer than 30 days — use a shorter duration"),
        ("1e3s", "invalid duration '1e3s' — write a number and a unit: 500ms, 10s, 1.5s, 5m, 1h (or 0)"),
        ("inf", "invalid duration 'inf' — write a number and a unit: 500ms, 10s, 1.5s, 5m, 1h (or 0)"),
        (" 1s", "invalid duration ' 1s' — write a number and a unit: 500ms, 10s, 1.5s, 5m, 1h (or 0)"),
    ],
)  # fmt: skip
def test_parse_duration_refuses(text: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_duration(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.5, "500ms"), (10, "10s"), (300, "5m"), (3600, "1h"), (1.5, "1.5s"), (0, "0"),
     (90, "90s"), (1.25, "1.25s"), (7200, "2h"), (0.001, "1ms")],
)  # fmt: skip
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


def test_spec_round_trips() -> None:
    spec = Spec("app", ("python3", "-c", "x"), pool="p1", interval=1.5, keep=7, restart="always",
                tcp_established=True, success_exit_codes=(0, 3), min_uptime=2.0, max_restarts=9,
                restart_window=60.0, stop_timeout=1.0)  # fmt: skip
    data = json.loads(json.dumps(spec.to_json()))
    assert Spec.from_json(data, source="here") == spec


def test_defaults_as_in_the_contract() -> None:
    spec = Spec.from_json({"name": "app", "command": ["sleep", "1"]}, source="here")
    assert spec == Spec("app", ("sleep", "1"), "default", 0.0, 3, "on-failure", False, (0,),
                        1.0, 5, 300.0, 5.0)  # fmt: skip


def _bad(**changes: object) -> str:
    data = {**Spec("app", ("sleep", "1")).to_json(), **changes}
    with pytest.raises(SupervisionRecordError) as info:
        Spec.from_json(data, source="/h/supervised/app.json")
    return str(info.value)


HINT = " — torpor did not write it: remove it, then `torpor supervise NAME` again"


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"keep": 0}, "has a bad keep: 0 is not within 1-10000"),
        ({"keep": True}, "has a bad keep (True)"),
        ({"keep": 1.0}, "has a bad keep (1.0)"),
        ({"interval": -1}, "has a bad interval: -1.0 is not a duration"),
        ({"interval": float("nan")}, "has a bad interval: nan is not a duration"),
        ({"interval": 10**400}, "has a bad interval: inf is not a duration"),
        ({"interval": 31 * 86400}, "has a bad interval: 2678400.0 s is longer than 30 days"),
        ({"restart_window": 0}, "has a bad restart_window: must be longer than 0"),
        ({"restart": "sometimes"}, "has a bad restart: 'sometimes' is not one of on-failure, always, no"),
        ({"name": "../etc"}, "has a bad name: '../etc' is not a valid process name"),
        ({"name": "keeper"}, "has a bad name: 'keeper' is reserved"),
        ({"pool": "a/b"}, "has a bad pool: 'a/b' is not a valid pool name"),
        ({"command": []}, "has a bad command: is empty"),
        ({"command": [""]}, "has a bad command: is empty"),
        ({"command": ["a\0b"]}, "has a bad command: holds a NUL byte"),
        ({"command": "sleep 1"}, "has a bad command ('sleep 1')"),
        ({"command": ["x"] * 5000}, "has a bad command (list ['x', 'x', 'x', 'x', 'x', 'x',...)"),
        ({"command": ["x" * (300 << 10)]}, "has a bad command: is longer than 262144 bytes"),
        ({"success_exit_codes": [256]}, "has a bad success_exit_codes: 256 is not an exit code (0-255)"),
        ({"success_exit_codes": [True]}, "has a bad success_exit_codes ([True])"),
        ({"tcp_established": 1}, "has a bad tcp_established (1)"),
        ({"max_restarts": -1}, "has a bad max_restarts: -1 is not within 0-10000"),
    ],
)  # fmt: skip
def test_from_json_refuses(changes: dict[str, object], problem: str) -> None:
    assert _bad(**changes) == f"supervision spec in /h/supervised/app.json {problem}; refused{HINT}"


def test_from_json_refuses_non_objects_and_missing_fields() -> None:
    for data, problem in (([], "is not a JSON object (list)"), ({"name": "a"}, "lacks command")):
        with pytest.raises(SupervisionRecordError) as info:
            Spec.from_json(data, source="S")
        assert str(info.value) == f"supervision spec in S {problem}; refused{HINT}"


def test_unknown_fields_are_ignored() -> None:
    spec = Spec.from_json({"name": "a", "command": ["x"], "from_the_future": 1}, source="S")
    assert spec == Spec("a", ("x",))


def test_made_spec_is_checked_too() -> None:
    with pytest.raises(UsageError) as info:
        Spec("app", ("x",), keep=0)
    assert str(info.value) == (
        "bad supervision setting keep: 0 is not within 1-10000 — keep 1 to 10000 checkpoints"
    )


# -- load -------------------------------------------------------------------------------------


def _record(home: Path, data: object, name: str = "app") -> Path:
    d = home / "supervised"
    d.mkdir(mode=0o700, exist_ok=True)
    path = d / f"{name}.json"
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


def test_load_active_spec(torpor_home: Path) -> None:
    spec = Spec("app", ("sleep", "1"), interval=1.0)
    _record(torpor_home, {"spec": spec.to_json(), "status": "supervised"})
    assert _spec.load("app") == spec


@pytest.mark.parametrize("status", ["stopped", "given-up", "shutdown", None])
def test_load_inactive_is_none(torpor_home: Path, status: str | None) -> None:
    _record(torpor_home, {"spec": Spec("app", ("x",)).to_json(), "status": status})
    assert _spec.load("app") is None


def test_load_without_home_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "no" / "home"
    monkeypatch.setenv("TORPOR_HOME", str(home))
    assert _spec.load("app") is None
    assert not (tmp_path / "no").exists()


def test_load_without_supervised_dir_creates_nothing(torpor_home: Path) -> None:
    assert _spec.load("app") is None
    assert not (torpor_home / "supervised").exists()


def test_load_never_raises_for_untrusted_records(torpor_home: Path) -> None:
    good = {"spec": Spec("app", ("x",)).to_json(), "status": "supervised"}
    path = _record(torpor_home, good)
    assert _spec.load("app") is not None
    path.chmod(0o666)
    assert _spec.load("app") is None  # writable by others
    path.chmod(0o600)
    path.write_text("{not json")
    assert _spec.load("app") is None
    path.unlink()
    other = torpor_home / "planted.json"
    other.write_text(json.dumps(good))
    path.symlink_to(other)
    assert _spec.load("app") is None  # never followed
    path.unlink()
    os.mkfifo(path)
    assert _spec.load("app") is None  # and never hangs
    assert _spec.load("../app") is None
    path.unlink()
    _record(torpor_home, {**good, "spec": {**good["spec"], "name": "other"}})
    assert _spec.load("app") == Spec("other", ("x",))  # the record's own check is _state's


def test_read_record_refusals_name_the_file(torpor_home: Path) -> None:
    path = _record(torpor_home, [1])
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(SupervisionRecordError) as info:
            _spec.read_record(fd, "app.json", source=str(path))
        assert str(info.value) == (
            f"supervision record {path} is not a JSON object; refused — "
            f"torpor did not write it: remove {path}"
        )
        path.write_bytes(b" " * (_spec.MAX_RECORD + 1))
        with pytest.raises(TorporError) as info2:
            _spec.read_record(fd, "app.json", source=str(path))
        assert str(info2.value).startswith(f"supervision record {path} is larger than 1048576")
    finally:
        os.close(fd)
