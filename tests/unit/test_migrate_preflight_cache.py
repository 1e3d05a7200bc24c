"""What the pre-flight keeps between migrations: the source's ``cpuinfo.img`` in its home (per
boot and CRIU binary) and a server's CRIU verdicts on the sources' CPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torpor._engine import _cpuinfo
from torpor._migrate import _preflight

from .test_migrate_preflight import WHERE, cpuinfo_img, message


@pytest.fixture
def source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A source home and CRIU binary; returns a list that grows by one per CRIU dump."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("TORPOR_HOME", str(home))
    binary = tmp_path / "criu"
    binary.write_bytes(b"#!")
    monkeypatch.setattr(_preflight, "find_criu", lambda: str(binary))
    dumps: list[int] = []

    def dump() -> bytes:
        dumps.append(1)
        return cpuinfo_img()

    monkeypatch.setattr(_cpuinfo, "dump", dump)
    return dumps


def test_the_cpuinfo_is_dumped_once_per_boot_and_binary(source: list[int], tmp_path: Path) -> None:
    assert _preflight.cached_cpuinfo() == cpuinfo_img()
    assert _preflight.cached_cpuinfo() == cpuinfo_img()
    assert len(source) == 1
    (tmp_path / "criu").write_bytes(b"#!new")  # another CRIU: its own dump
    assert _preflight.cached_cpuinfo() == cpuinfo_img()
    assert len(source) == 2


@pytest.mark.parametrize("bad", ["not base64!", "AAAA", 7])
def test_a_cached_cpuinfo_that_does_not_parse_is_dumped_again(
    source: list[int], tmp_path: Path, bad: object
) -> None:
    _preflight.cached_cpuinfo()
    cache = tmp_path / "home" / "cpuinfo-cache.json"
    (key,) = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: bad}))
    assert _preflight.cached_cpuinfo() == cpuinfo_img()
    assert len(source) == 2


def test_a_servers_verdicts_spare_the_check_for_a_cpu_it_has_judged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("TORPOR_HOME", str(home))
    monkeypatch.setattr(_preflight, "criu_version", lambda: "4.2.1")
    monkeypatch.setattr(_cpuinfo, "this_cpu", lambda: "Old CPU")
    checks: list[bytes] = []

    def check(data: bytes) -> list[str]:
        checks.append(data)
        return ["cpu: no avx512"]

    monkeypatch.setattr(_cpuinfo, "check", check)
    verdicts: dict[bytes, list[str]] = {}
    first = _preflight.problems(message(), where=WHERE, verdicts=verdicts)
    again = _preflight.problems(message(), where=WHERE, verdicts=verdicts)
    assert first == again and any("no avx512" in p for p in first)
    assert len(checks) == 1
    _preflight.problems(message(), where=WHERE)  # no verdicts kept: checked each time
    assert len(checks) == 2
