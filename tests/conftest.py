"""Test suite policy, declared once.

Tests are split by what they need: ``unit`` (nothing), ``integration`` (root + real CRIU),
``cluster`` (real Ceph daemons), ``migration`` (network namespaces). Locally a missing
capability is a skip with the reason; in CI (``CI=true``) every skip and every xfail, however
it comes, is a failure (:class:`CIGuard`): every test must run, and pass, there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Generator

import pytest

IN_CI = os.environ.get("CI") == "true"


@functools.cache
def criu_problem() -> str | None:
    """Why real-CRIU tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (CRIU)"
    try:
        from torpor._engine import find_criu

        find_criu()
    except Exception as exc:
        return f"no usable CRIU: {exc}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("criu") or item.get_closest_marker("root"):
            reason = criu_problem()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
        if item.get_closest_marker("netns") and shutil.which("ip") is None:
            item.add_marker(pytest.mark.skip(reason="needs iproute2 (`ip`) for network namespaces"))


def pytest_configure(config: pytest.Config) -> None:
    if IN_CI:
        # A plugin, not hooks of this conftest: a collect report of a directory whose conftest
        # skipped is not shown to conftest hooks, only to plugins.
        config.pluginmanager.register(CIGuard(), "torpor-ci-guard")


class CIGuard:
    """In CI every way out of running a test is a failure: a skip (runtime `pytest.skip`, a skip
    or skipif marker, a skip in a fixture, unittest's skips), a skip of a whole collector
    (module-level `pytest.importorskip`, `pytest.skip(..., allow_module_level=True)`,
    `unittest.SkipTest`, or a conftest that skips), or an xfail (marker or `pytest.xfail`, strict
    or not, and an unexpected pass). What was skipped or xfailed was not proved to work, and CI
    is where it must be."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        """A skipped, xfailed or xpassed test (in any phase) fails."""
        report = yield
        if hasattr(report, "wasxfail"):
            what = "xfailed" if report.skipped else "xpassed"
            reason = report.wasxfail
            # Without wasxfail the report is a plain failure everywhere (terminal, junitxml).
            del report.wasxfail
            report.outcome = "failed"
            report.longrepr = f"{what} in CI, which must pass every test: {reason}"
        elif report.skipped:
            report.outcome = "failed"
            report.longrepr = f"{SKIPPED_IN_CI}{_reason(report.longrepr)}"
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(
        self, collector: pytest.Collector
    ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
        """A collector skipped while collected (no test report is ever made for its tests) is a
        collection error, as an import that fails without importorskip is: pytest then runs no
        test and exits non-zero."""
        report = yield
        if report.skipped:
            report.outcome = "failed"
            report.longrepr = f"{SKIPPED_IN_CI}{_reason(report.longrepr)}"
        return report


SKIPPED_IN_CI = "skipped in CI, which must run every test: "


def _reason(longrepr: object) -> object:
    # A skip's longrepr is (path, lineno, "Skipped: reason").
    return longrepr[2] if isinstance(longrepr, tuple) else longrepr


@pytest.fixture
def torpor_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """A private TORPOR_HOME; every managed process started in it, and its agent, is stopped
    (by pid) at the end of the test."""
    home = tmp_path_factory.mktemp("torpor-home")
    monkeypatch.setenv("TORPOR_HOME", str(home))
    yield home
    _kill_managed(home)


def _kill_managed(home: os.PathLike[str]) -> None:
    import json
    import signal
    import time
    from pathlib import Path

    from torpor._process._proc import ProcRef

    refs: list[ProcRef] = []
    # An agent a test started in this home: asked to stop (its idle workers end with it), and
    # given the time to; only then killed.
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(Path(home, "agent.pid").read_text())
        agent = ProcRef(data["pid"], data["start_time"])
        if agent.alive():
            os.kill(agent.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while agent.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            refs.append(agent)
    # The home's supervisor first (it would restore what is killed next): killed, not
    # stopped, as a SIGTERM makes it checkpoint everything first.
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(Path(home, "supervised", ".daemon.pid").read_text())
        daemon = ProcRef(data["pid"], data["start_time"])
        if daemon.alive():
            os.kill(daemon.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while daemon.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
    for rec_file in Path(home, "procs").glob("*.json"):
        try:
            rec = json.loads(rec_file.read_text())
        except (OSError, ValueError):
            continue
        refs.append(ProcRef(rec["pid"], rec["start_time"]))
    for ref in refs:
        if ref.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(ref.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(r.alive() for r in refs) and time.monotonic() < deadline:
        time.sleep(0.02)
    _drop_memory_staging(home)


def _drop_memory_staging(home: os.PathLike[str]) -> None:
    """Remove the home's (empty) staging directory in /dev/shm (``_topool.memory_staging``)."""
    import hashlib

    tag = hashlib.sha256(os.fsencode(os.fspath(home))).hexdigest()[:12]
    with contextlib.suppress(OSError):
        os.rmdir(f"/dev/shm/torpor-{os.geteuid()}-{tag}")
