# ruff: noqa: E501 - whole table lines and messages are asserted, each on one line
"""The event log (append, rotation, hostile reads) and the two commands that show what
supervision did: ``torpor events`` and ``torpor logs``."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from torpor import UnsafePathError
from torpor._cli import _events as cli_events
from torpor._cli import main
from torpor._supervise import _events
from torpor._supervise._events import MAX_FILE, MAX_LINE


def _lines(home: Path, name: str = "app.jsonl") -> list[dict[str, object]]:
    return [json.loads(line) for line in (home / "events" / name).read_text().splitlines()]


def test_append_and_read(torpor_home: Path) -> None:
    _events.append("app", "checkpoint", image="app.s000001", duration_s=0.5, frozen_ms=None)
    _events.append("app", "crash", signal=9)
    got = _events.read("app")
    assert [(e.kind, dict(e.fields)) for e in got] == [
        ("checkpoint", {"image": "app.s000001", "duration_s": 0.5, "frozen_ms": None}),
        ("crash", {"signal": 9}),
    ]
    assert len(got[0].time) == len("2026-01-01T00:00:00.000Z") and got[0].time.endswith("Z")
    path = torpor_home / "events" / "app.jsonl"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [e.kind for e in _events.read("app", limit=1)] == ["crash"]
    assert _events.read("app", limit=0) == []


def test_append_refuses_unknown_kinds_and_reserved_fields(torpor_home: Path) -> None:
    with pytest.raises(ValueError):
        _events.append("app", "explode")
    with pytest.raises(ValueError):
        _events.append("app", "crash", time="now")


def test_long_fields_are_truncated_under_a_line(torpor_home: Path) -> None:
    _events.append("app", "checkpoint-failed", error="é" * 10_000, nan=float("nan"))
    raw = (torpor_home / "events" / "app.jsonl").read_bytes()
    assert raw.count(b"\n") == 1 and len(raw) < MAX_LINE
    (event,) = _events.read("app")
    assert event.fields["error"] == "é" * 256 + "..."
    assert event.fields["truncated"] is True and event.fields["nan"] is None
    many = {f"f{i}": "x" * 100 for i in range(200)}
    line = _events.encode("crash", many, time="2026-01-01T00:00:00.000Z")
    assert len(line) < MAX_LINE and json.loads(line)["truncated"] is True


def test_rotation_keeps_one_old_file(torpor_home: Path) -> None:
    big = "x" * 1000
    n = 2 * MAX_FILE // 1000 + 600  # enough for two rotations
    for i in range(n):
        _events.append("app", "checkpoint", image=big, seq=i)
    files = sorted(p.name for p in (torpor_home / "events").iterdir())
    assert files == ["app.jsonl", "app.jsonl.1"]
    assert all(p.stat().st_size <= MAX_FILE for p in (torpor_home / "events").iterdir())
    seqs = [e.fields["seq"] for e in _events.read("app")]
    assert seqs == list(range(n - len(seqs), n)) and len(seqs) > MAX_FILE // 1100
    assert [e.fields["seq"] for e in _events.read("app", limit=3)] == [n - 3, n - 2, n - 1]


def test_concurrent_appends_keep_lines_whole(torpor_home: Path) -> None:
    def write(tag: str) -> None:
        for i in range(200):
            _events.append("app", "checkpoint", tag=tag, seq=i, pad="y" * 500)

    threads = [threading.Thread(target=write, args=(t,)) for t in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    skipped: list[str] = []
    got = _events.read("app", skipped=skipped)
    assert skipped == [] and len(got) == 800


def test_garbage_lines_are_skipped_and_counted(torpor_home: Path) -> None:
    _events.append("app", "crash", exit_code=1)
    with open(torpor_home / "events" / "app.jsonl", "ab") as fh:
        fh.write(b"garbage\n\xff\xfe\n[1]\n{}\n" + b'{"time":"x","kind":"crash"}\n')
        fh.write(
            b'{"time":"2026-01-01T00:00:00Z","kind":"crash","nested":{"a":1},"esc":"\\u001b[2J"}\n'
        )
        fh.write(b'{"time":"2026-01-01T00:00:00Z","kind":"cr')  # a writer killed mid-line
    skipped: list[str] = []
    got = _events.read("app", skipped=skipped)
    assert [dict(e.fields) for e in got] == [{"exit_code": 1}, {"esc": "?[2J"}]
    assert skipped == [f"6 lines are not events in {torpor_home / 'events' / 'app.jsonl'}; skipped"]


def test_hostile_log_files(torpor_home: Path) -> None:
    _events.append("app", "crash")
    path = torpor_home / "events" / "app.jsonl"
    path.unlink()
    target = torpor_home / "target"
    target.write_text("")
    path.symlink_to(target)
    with pytest.raises(UnsafePathError):
        _events.append("app", "crash")
    with pytest.raises(UnsafePathError):
        _events.read("app")
    assert target.read_text() == ""
    path.unlink()
    os.link(target, path)  # a hard link to a file elsewhere: appending would write there
    with pytest.raises(UnsafePathError) as info:
        _events.append("app", "crash")
    assert (
        str(info.value)
        == f"event log {path} has 2 links; refused — torpor did not make it: remove {path}"
    )
    assert target.read_text() == ""


def test_read_without_home_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORPOR_HOME", str(tmp_path / "h"))
    assert _events.read("app") == []
    assert not (tmp_path / "h").exists()


# -- torpor events ----------------------------------------------------------------------------


def test_details_per_kind() -> None:
    d = cli_events.details
    assert d(
        "checkpoint",
        {
            "image": "app.s000002",
            "pool": "default",
            "duration_s": 0.42,
            "frozen_ms": 12.3,
            "new_bytes": 1536,
            "bytes": 2 << 20,
        },
    ) == ("app.s000002, in 0.42s, frozen 12 ms, 1.5 KiB new, 2.0 MiB in all, pool=default")
    assert (
        d("checkpoint", {"image": "a.s000001", "frozen_ms": 3.25, "new_bytes": None})
        == "a.s000001, frozen 3.2 ms"
    )
    assert d("crash", {"signal": 6, "uptime_s": 3.0}) == "killed by SIGABRT, after 3.00s"
    assert d("crash", {"exit_code": 3, "signal": None}) == "exited 3"
    assert d("crash", {}) == "ended, status unknown"
    assert (
        d("restore", {"image": "a.s000001", "fallback": True, "duration_s": 0.1})
        == "from a.s000001 (fallback: newer ones failed), in 0.10s"
    )
    assert d("restore", {"image": "a.s000003", "fallback": False}) == "from a.s000003"
    assert d("skipped", {"image": "a.s000003", "error": "corrupted"}) == "a.s000003, corrupted"
    assert d("give-up", {"reason": "5 restarts within 5m"}) == "5 restarts within 5m"
    assert d("lease", {"holder": "hostA", "ok": True}) == "holder=hostA, ok=yes"


def test_events_command(torpor_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open(torpor_home / "x", "w"):
        pass
    (torpor_home / "events").mkdir(mode=0o700)
    (torpor_home / "events" / "app.jsonl").write_text(
        '{"time":"2026-01-01T00:00:00.000Z","kind":"crash","signal":9}\n'
        '{"time":"2026-01-01T00:00:01.000Z","kind":"give-up","reason":"no checkpoint left"}\n'
    )
    os.chmod(torpor_home / "events" / "app.jsonl", 0o600)
    os.environ["TZ"] = "UTC"
    time.tzset()
    assert main(["events", "app"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "TIME                 EVENT    DETAILS",
        "2026-01-01 00:00:00  crash    killed by SIGKILL",
        "2026-01-01 00:00:01  give-up  no checkpoint left",
    ]
    assert main(["events", "app", "--json", "-n", "1"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"time": "2026-01-01T00:00:01.000Z", "kind": "give-up", "reason": "no checkpoint left"}
    ]


def test_events_of_unknown_name(torpor_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["events", "nope"]) == 1
    assert capsys.readouterr().err == (
        "torpor: error: no events of 'nope': it is not a managed process — `torpor ps -a` lists managed processes\n"
    )


# -- torpor logs ------------------------------------------------------------------------------


def _log(home: Path, text: bytes) -> Path:
    d = home / "logs"
    d.mkdir(mode=0o700, exist_ok=True)
    path = d / "app.log"
    path.write_bytes(text)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("content", "args", "out"),
    [
        (b"a\nb\nc\n", ["-n", "2"], "b\nc\n"),
        (b"a\nb\nc", ["-n", "2"], "b\nc"),
        (b"a\nb\nc\n", ["-n", "9"], "a\nb\nc\n"),
        (b"a\nb\nc\n", ["-n", "0"], ""),
        (b"a\nb\nc\n", ["-n", "all"], "a\nb\nc\n"),
        (
            b"".join(b"%d\n" % i for i in range(100_000)),
            [],
            "".join(f"{i}\n" for i in range(99_800, 100_000)),
        ),
    ],
)
def test_logs_tail(
    torpor_home: Path, capsys: pytest.CaptureFixture[str], content: bytes, args: list[str], out: str
) -> None:
    _log(torpor_home, content)
    assert main(["logs", "app", *args]) == 0
    assert capsys.readouterr().out == out


def test_logs_refuses_planted_logs(torpor_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _log(torpor_home, b"x\n")
    path.unlink()
    secret = torpor_home / "secret"
    secret.write_text("secret\n")
    path.symlink_to(secret)
    assert main(["logs", "app"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err
        == f"torpor: error: log {path} is a symlink; refused — torpor did not make it: remove {path}\n"
    )
    path.unlink()
    os.mkfifo(path)
    assert main(["logs", "app"]) == 1
    assert (
        capsys.readouterr().err
        == f"torpor: error: log {path} is a FIFO, not a regular file; refused — torpor did not make it: remove {path}\n"
    )


def test_logs_of_unknown_name(torpor_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["logs", "nope", "-f"]) == 1
    assert capsys.readouterr().err == (
        f"torpor: error: no log of 'nope' ({torpor_home / 'logs' / 'nope.log'}) — "
        "`torpor ps -a` lists managed processes (started with --no-log: none)\n"
    )


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)


def test_follow_across_truncation_and_recreation(torpor_home: Path) -> None:
    path = _log(torpor_home, b"one\n")
    log = cli_events._Log(path)
    assert log.open()
    got: list[bytes] = []

    class Done(Exception):
        pass

    steps = iter(
        [
            lambda: _append(path, b"two\n"),
            lambda: path.write_bytes(b"three\n"),  # truncated, then written
            lambda: (
                _append(path, b"four\n"),
                path.rename(path.with_name("old")),
                _log(torpor_home, b"five\n"),
            ),
            lambda: None,  # "four", drained from the old file
        ]
    )

    def emit(data: bytes) -> None:
        got.append(data)
        try:
            next(steps)()
        except StopIteration:
            raise Done from None

    def hang(signum: int, frame: object) -> None:
        raise AssertionError("logs -f did not follow the new log within 5 s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(5)
    try:
        emit(log.tail(None))
        with pytest.raises(Done):
            log.follow(emit)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        log.close()
    assert b"".join(got) == b"one\ntwo\nthree\nfour\nfive\n"
