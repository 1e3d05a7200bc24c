"""``torpor doctor`` reports CRIU's kernel-facts cache (``_engine._kdat``) as a restore gets it."""

from __future__ import annotations

import os

import pytest

from torpor import _doctor
from torpor._engine import _kdat


@pytest.fixture
def run_is_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_kdat.ENV, raising=False)
    monkeypatch.setattr(_kdat, "fs_type", lambda fd: 0xEF53)  # ext4
    monkeypatch.setattr(os, "geteuid", lambda: 0)


@pytest.mark.usefixtures("run_is_disk")
def test_a_cache_made_or_found_is_reported_working(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def ensure(binary: str) -> bool:
        asked.append(binary)
        return True

    monkeypatch.setattr(_kdat, "ensure", ensure)
    cap = _doctor.kdat_capability("/usr/local/sbin/criu")
    assert (cap.ok, cap.detail) == (
        True,
        "/run/criu.kdat (torpor's read-only bind mount, until reboot)",
    )
    assert asked == ["/usr/local/sbin/criu"]  # made as a restore would, for that binary


@pytest.mark.usefixtures("run_is_disk")
def test_a_cache_that_cannot_be_made_is_missing_with_its_cost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_kdat, "ensure", lambda binary: False)
    cap = _doctor.kdat_capability("criu")
    assert cap.ok is False
    assert cap.detail == "could not be made over /run/criu.kdat (/run is not a tmpfs)"
    assert cap.cost.startswith("each CRIU process probes the kernel first")


@pytest.mark.parametrize("value", ["off", "0", "No"])
def test_turned_off_is_missing_and_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(_kdat.ENV, value)
    monkeypatch.setattr(_kdat, "ensure", lambda binary: pytest.fail("made while off"))
    cap = _doctor.kdat_capability("criu")
    assert (cap.ok, cap.detail) == (False, f"off (TORPOR_CRIU_KDAT={value})")


def test_a_tmpfs_run_is_criu_s_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_kdat.ENV, raising=False)
    monkeypatch.setattr(_kdat, "fs_type", lambda fd: _kdat.TMPFS_MAGIC)
    monkeypatch.setattr(_kdat, "ensure", lambda binary: pytest.fail("made on a tmpfs /run"))
    cap = _doctor.kdat_capability("criu")
    assert (cap.ok, cap.detail) == (True, "kept by CRIU itself (/run is a tmpfs)")


@pytest.mark.usefixtures("run_is_disk")
def test_not_root_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(_kdat, "ensure", lambda binary: pytest.fail("made as a user"))
    cap = _doctor.kdat_capability("criu")
    assert (cap.ok, cap.detail) == (False, "not made: /run is not a tmpfs and this is not root")
