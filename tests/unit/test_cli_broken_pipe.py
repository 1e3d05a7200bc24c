"""A command whose stdout's reader has gone (``torpor ps | head -0``) ends quietly, as one
killed by SIGPIPE would, instead of an internal error or a traceback at exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.usefixtures("torpor_home")


def _run_into_a_closed_pipe(*argv: str) -> subprocess.CompletedProcess[str]:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes a byte
    try:
        return subprocess.run(
            [sys.executable, "-m", "torpor", *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TORPOR_AGENT": "off"},
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)


def test_a_gone_reader_ends_the_command_quietly_with_sigpipes_code() -> None:
    res = _run_into_a_closed_pipe("doctor", "--json")
    assert (res.returncode, res.stderr) == (128 + signal.SIGPIPE, "")


def test_a_broken_pipe_that_is_not_stdout_is_still_an_internal_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from torpor import _cli, _doctor

    def broken(*_: object, **__: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(_doctor, "probe", broken)
    assert _cli.main(["doctor"]) == 70
    assert capsys.readouterr().err == (
        "torpor: internal error: BrokenPipeError(32, 'Broken pipe') "
        "(set TORPOR_DEBUG=1 for a traceback and report it)\n"
    )
