"""Fuzzing the records of supervision, which name commands a restore or ``torpor resume`` runs
as root: specs from hostile JSON (manifests, pool objects), planted supervision records and
event logs of random bytes. Every read ends with a value or a one-line
:class:`~torpor.TorporError`, in bounded time, and writes nothing outside the home."""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from torpor._cli import main
from torpor._supervise import _events, _spec, _state
from torpor._supervise._spec import Spec

from .support import JSON_VALUES, Jail, bounded, mutated_json, verdict

BASE_SPEC = Spec("app", ("sleep", "100"), interval=1.0).to_json()
BASE_STATE = {
    "spec": BASE_SPEC,
    "status": "supervised",
    "restores": 1,
    "kept": 2,
    "last_crash": {"time": "2026-01-01T00:00:00Z", "signal": 9, "exit_code": None, "uptime_s": 1},
    "last_checkpoint": {
        "image": "app.s000001",
        "time": "2026-01-01T00:00:00Z",
        "duration_s": 0.5,
        "frozen_ms": 3.0,
        "new_bytes": 10,
    },
    "given_up": None,
    "failed_checkpoints": 0,
}


@given(st.one_of(mutated_json(BASE_SPEC), JSON_VALUES))
@example(BASE_SPEC)
@example({**BASE_SPEC, "interval": 1e308 * 10})
@example({**BASE_SPEC, "keep": 10**5000})
def test_spec_from_json(data: Any) -> None:
    with bounded(2.0):
        got = verdict(lambda: Spec.from_json(data, source="fuzz"))
    if isinstance(got, Spec):
        # What is accepted is what torpor writes: it round-trips.
        assert Spec.from_json(json.loads(json.dumps(got.to_json())), source="again") == got


@given(st.one_of(mutated_json(BASE_STATE).map(json.dumps).map(str.encode), st.binary(max_size=200)))
@example(json.dumps(BASE_STATE).encode())
@example(b"[" * 10_000 + b"]" * 10_000)
def test_planted_state(raw: bytes) -> None:
    with Jail() as jail:
        d = jail.home / "supervised"
        d.mkdir(mode=0o700)
        (d / "app.json").write_bytes(raw)
        os.chmod(d / "app.json", 0o600)
        with bounded(2.0):
            got = verdict(lambda: _state.read("app"))
            verdict(lambda: _state.list_all([]))
            spec = _spec.load("app")  # never raises
        if isinstance(got, _state.State):
            assert spec == (got.spec if got.status == "supervised" else None)
            assert verdict(lambda: _state.save(got)) is None
            assert _state.read("app") == got


EVENT = {"time": "2026-01-01T00:00:00Z", "kind": "crash", "signal": 9}
EVENT_LINES = st.one_of(st.binary(max_size=80), mutated_json(EVENT).map(json.dumps).map(str.encode))


@given(st.lists(EVENT_LINES, max_size=20))
@example([json.dumps(EVENT).encode(), b'{"time": "2026-01-01T00:00:00Z", "ki'])
def test_planted_events(lines: list[bytes]) -> None:
    with Jail() as jail:
        d = jail.home / "events"
        d.mkdir(mode=0o700)
        (d / "app.jsonl").write_bytes(b"\n".join(lines))
        os.chmod(d / "app.jsonl", 0o600)
        with bounded(2.0):
            got = verdict(lambda: _events.read("app"))
            assert isinstance(got, list)
            assert main(["events", "app"]) in (0, 1)
            assert main(["events", "app", "--json"]) in (0, 1)
            _events.append("app", "crash", signal=6)
            after = _events.read("app")
        assert after[-1].kind == "crash" and after[-1].fields["signal"] == 6
