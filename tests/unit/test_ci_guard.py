"""The CI guard in ``tests/conftest.py``: under ``CI=true`` every skip and every xfail is a
failure, whichever way it comes (at run time, from a marker, in a fixture, or while a module is
collected); without ``CI`` a skip stays a skip.

Each case is a tiny suite run by pytester (in-process) with a copy of the real conftest. The same
case run without ``CI`` must give its skip or xfail, so a case that fails for another reason (a
typo in it) cannot pass for a guarded one.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).parents[1] / "conftest.py"
# The tiny suites need no plugin but pytester's; hypothesis' would cost a second a run.
PLAIN = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:timeout")


@dataclass(frozen=True)
class Case:
    """A tiny test file, what it gives without CI, and what it must give in CI."""

    source: str
    local: dict[str, int]
    ci: dict[str, int]
    ci_message: str  # the guard's message, up to the case's reason
    path: str = "test_case.py"


SKIPPED = "skipped in CI, which must run every test: "
RUN_SKIP_IN_CI = {"failed": 1, "passed": 1}
SETUP_SKIP_IN_CI = {"errors": 1, "passed": 1}
# A collector skipped in CI is a collection error: pytest runs nothing (not even test_ok).
COLLECT_SKIP_IN_CI = {"errors": 1}

CASES = {
    "pytest.skip": Case(
        """
        import pytest
        def test_it():
            pytest.skip("no_thing_here")
        """,
        {"skipped": 1, "passed": 1},
        RUN_SKIP_IN_CI,
        SKIPPED,
    ),
    "importorskip in a test": Case(
        """
        import pytest
        def test_it():
            pytest.importorskip("no_thing_here")
        """,
        {"skipped": 1, "passed": 1},
        RUN_SKIP_IN_CI,
        SKIPPED,
    ),
    "skip marker": Case(
        """
        import pytest
        @pytest.mark.skip(reason="no_thing_here")
        def test_it():
            pass
        """,
        {"skipped": 1, "passed": 1},
        SETUP_SKIP_IN_CI,
        SKIPPED,
    ),
    "skipif marker": Case(
        """
        import pytest
        @pytest.mark.skipif(True, reason="no_thing_here")
        def test_it():
            pass
        """,
        {"skipped": 1, "passed": 1},
        SETUP_SKIP_IN_CI,
        SKIPPED,
    ),
    "skip marker on a module": Case(
        """
        import pytest
        pytestmark = pytest.mark.skip(reason="no_thing_here")
        def test_it():
            pass
        """,
        {"skipped": 1, "passed": 1},
        SETUP_SKIP_IN_CI,
        SKIPPED,
    ),
    "skip in a fixture": Case(
        """
        import pytest
        @pytest.fixture
        def thing():
            pytest.skip("no_thing_here")
        def test_it(thing):
            pass
        """,
        {"skipped": 1, "passed": 1},
        SETUP_SKIP_IN_CI,
        SKIPPED,
    ),
    "unittest skip": Case(
        """
        import unittest
        class T(unittest.TestCase):
            @unittest.skip("no_thing_here")
            def test_it(self):
                pass
        """,
        {"skipped": 1, "passed": 1},
        RUN_SKIP_IN_CI,
        SKIPPED,
    ),
    "module-level importorskip": Case(
        """
        import pytest
        pytest.importorskip("no_thing_here")
        def test_it():
            pass
        """,
        {"skipped": 1, "passed": 1},
        COLLECT_SKIP_IN_CI,
        SKIPPED,
    ),
    "module-level skip": Case(
        """
        import pytest
        pytest.skip("no_thing_here", allow_module_level=True)
        def test_it():
            pass
        """,
        {"skipped": 1, "passed": 1},
        COLLECT_SKIP_IN_CI,
        SKIPPED,
    ),
    "module-level unittest.SkipTest": Case(
        """
        import unittest
        raise unittest.SkipTest("no_thing_here")
        def test_it():
            pass
        """,
        {"skipped": 1, "passed": 1},
        COLLECT_SKIP_IN_CI,
        SKIPPED,
    ),
    "a conftest that skips": Case(
        """
        import pytest
        pytest.skip("no_thing_here", allow_module_level=True)
        """,
        {"skipped": 1, "passed": 1},
        COLLECT_SKIP_IN_CI,
        SKIPPED,
        path="sub/conftest.py",
    ),
    "xfail marker": Case(
        """
        import pytest
        @pytest.mark.xfail(reason="no_thing_here")
        def test_it():
            assert False
        """,
        {"xfailed": 1, "passed": 1},
        RUN_SKIP_IN_CI,
        "xfailed in CI, which must pass every test: ",
    ),
    "strict xfail marker": Case(
        """
        import pytest
        @pytest.mark.xfail(strict=True, reason="no_thing_here")
        def test_it():
            assert False
        """,
        {"xfailed": 1, "passed": 1},
        RUN_SKIP_IN_CI,
        "xfailed in CI, which must pass every test: ",
    ),
    "xfail marker, not run": Case(
        """
        import pytest
        @pytest.mark.xfail(run=False, reason="no_thing_here")
        def test_it():
            pass
        """,
        {"xfailed": 1, "passed": 1},
        SETUP_SKIP_IN_CI,
        "xfailed in CI, which must pass every test: [NOTRUN] ",
    ),
    "pytest.xfail": Case(
        """
        import pytest
        def test_it():
            pytest.xfail("no_thing_here")
        """,
        {"xfailed": 1, "passed": 1},
        RUN_SKIP_IN_CI,
        "xfailed in CI, which must pass every test: ",
    ),
    "pytest.xfail in a fixture": Case(
        """
        import pytest
        @pytest.fixture
        def thing():
            pytest.xfail("no_thing_here")
        def test_it(thing):
            pass
        """,
        {"xfailed": 1, "passed": 1},
        SETUP_SKIP_IN_CI,
        "xfailed in CI, which must pass every test: ",
    ),
    "xpass": Case(
        """
        import pytest
        @pytest.mark.xfail(reason="no_thing_here")
        def test_it():
            pass
        """,
        {"xpassed": 1, "passed": 1},
        RUN_SKIP_IN_CI,
        "xpassed in CI, which must pass every test: ",
    ),
}


def _run(pytester: pytest.Pytester, case: Case) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST.read_text())
    (pytester.path / case.path).parent.mkdir(exist_ok=True)
    (pytester.path / case.path).write_text(textwrap.dedent(case.source))
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    return pytester.runpytest(*PLAIN, "-rA")


@pytest.mark.parametrize("name", CASES)
def test_in_ci_every_skip_and_xfail_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    case = CASES[name]
    monkeypatch.setenv("CI", "true")
    result = _run(pytester, case)
    assert result.parseoutcomes() == case.ci
    expected_rc = pytest.ExitCode.INTERRUPTED if case.ci is COLLECT_SKIP_IN_CI else 1
    assert result.ret == expected_rc
    result.stdout.fnmatch_lines([f"*{glob.escape(case.ci_message)}*no_thing_here*"])


@pytest.mark.parametrize("name", CASES)
def test_without_ci_a_skip_stays_a_skip(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    case = CASES[name]
    monkeypatch.delenv("CI", raising=False)
    result = _run(pytester, case)
    assert result.parseoutcomes() == case.local
    assert result.ret == pytest.ExitCode.OK
    result.stdout.no_fnmatch_line("*in CI, which must*")


def test_a_strict_xpass_fails_in_ci_as_it_does_anywhere(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    strict = """
        import pytest
        @pytest.mark.xfail(strict=True, reason="x")
        def test_it():
            pass
        """
    result = _run(pytester, Case(strict, {}, {}, ""))
    assert result.parseoutcomes() == {"failed": 1, "passed": 1}
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*XPASS(strict)*"])


@pytest.mark.parametrize(("pytest_rc", "rc"), [(0, 0), (1, 1), (2, 2), (5, 1)])
def test_scripts_test_fails_when_no_test_is_collected(
    tmp_path: Path, pytest_rc: int, rc: int
) -> None:
    """The real ``scripts/test``, in a tree where setup, lint and type checks pass at once and
    pytest exits ``pytest_rc``: exit 5 (nothing collected) is a failure, the rest pass through."""
    root = Path(__file__).parents[2]
    (tmp_path / "scripts").mkdir()
    shutil.copy(root / "scripts" / "test", tmp_path / "scripts" / "test")
    stubs = {"scripts/setup.sh": 0, ".venv/bin/ruff": 0, ".venv/bin/mypy": 0}
    stubs[".venv/bin/pytest"] = pytest_rc
    for path, code in stubs.items():
        stub = tmp_path / path
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text(f"#!/bin/sh\nexit {code}\n")
        stub.chmod(0o755)
    proc = subprocess.run(
        [str(tmp_path / "scripts" / "test")], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == rc, proc.stderr
    expected = "test: no tests were collected\n" if pytest_rc == 5 else ""
    assert proc.stderr == expected
