"""The harness can fail: each invariant check, shown a real violation planted on purpose,
raises; and a fault fires on the process it names (a suite whose checks could not fail, or
whose faults never land, would pass on any torpor)."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from . import procs
from .harness import TIMEOUT, Fault, Lab, Outcome
from .invariants import check_output, check_ps, check_quiet, continues, survived

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.timeout(TIMEOUT)]


def _raises(check: Callable[[], object], words: str) -> None:
    with pytest.raises(AssertionError) as caught:
        check()
    assert words in str(caught.value).splitlines()[0], str(caught.value)


@pytest.mark.parametrize(
    ("rc", "stderr", "words"),
    [
        (1, "torpor: error: one\ntorpor: error: two\n", "the error is not one line"),
        (1, "Traceback (most recent call last):\n", "stderr holds 'Traceback'"),
        (70, "torpor: internal error: OSError(28)\n", "stderr holds 'internal error'"),
        (1, "torpor: error: keeper failed: OSError(28, 'No space')\n", "a foreign exception"),
        (1, "oops\n", "not a torpor error"),
        (2, "torpor: error: usage\n", "exit status 2"),
    ],
)
def test_bad_errors_are_caught(
    make_lab: Callable[..., Lab], rc: int, stderr: str, words: str
) -> None:
    lab = make_lab()
    _raises(lambda: check_output(lab, Outcome(("x",), rc, "", stderr)), words)
    check_output(lab, Outcome(("x",), 1, "", "torpor: error: one line — the hint\n"))
    check_output(lab, Outcome(("x",), -9, "", "half a line"))  # a killed CLI says what it got to


def test_a_lost_process_is_caught(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    app = lab.start_app("lost")
    floor = lab.last_count(app.ref.pid)
    assert procs.signal_ref(app.ref)
    assert procs.wait_until(lambda: not app.ref.alive(), 5)
    out = Outcome(("checkpoint", "lost", "--name", "gone"), -9, "", "", Fault("start", 0, "cli"))
    committed = lab.home / "images" / "gone"
    _raises(
        lambda: survived(
            lab, app, out, image="gone", committed=committed, floor=floor, leave_running=False
        ),
        "LOST: the app",
    )


def test_a_stopped_process_and_an_unlisted_one_are_caught(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    app = lab.start_app("stopped")
    out = Outcome(("checkpoint", "stopped"), 0, "", "")
    assert procs.signal_ref(app.ref, signal.SIGSTOP)
    assert procs.wait_until(lambda: app.ref.state() == "T", 5)
    _raises(lambda: check_quiet(lab, out), "left stopped (state T)")
    assert procs.signal_ref(app.ref, signal.SIGCONT)
    check_quiet(lab, out)
    check_ps(lab, "listed")
    # A copy of the app torpor knows nothing of (started behind its back).
    stray = lab.tree.spawn(lab.app_argv(), lab.env)
    try:
        assert procs.wait_until(lambda: len(lab.counts().get(stray.pid, [])) >= 1, 5)
        _raises(lambda: check_ps(lab, "stray"), "does not list as running")
    finally:
        lab.tree.forget(stray)


def test_a_fresh_start_is_not_a_restore(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    first = lab.start_app("first")
    assert procs.wait_until(lambda: lab.last_count(first.ref.pid) >= 8, 5)
    floor = lab.last_count(first.ref.pid)
    again = lab.start_app("again")  # counts from 1, as a restart would
    _raises(lambda: continues(lab, [again.ref.pid], floor, floor + 2, "x"), "began at 1")


def test_faults_land_on_their_victims(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    app = lab.start_app("victim")
    out = lab.run(
        ["checkpoint", "victim", "--name", "v", "--leave-running"],
        Fault("pages", 0.0, "criu"),
        keeper=app.keeper,
    )
    assert out.fired is not None and out.fired.startswith("killed criu (pid "), out.story
    check_output(lab, out)
    assert out.rc == 1, out.story  # CRIU died mid-dump: the checkpoint failed
    assert out.stderr.startswith("torpor: error: checkpoint of pid "), out.story
    out = lab.run(["checkpoint", "victim", "--name", "w"], Fault("start", 0.05, "cli"))
    assert out.fired is not None and out.fired.startswith("killed cli (pid "), out.story
    assert out.killed and out.rc == -signal.SIGKILL, out.story


def test_a_damaged_image_is_caught(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    app = lab.start_app("damaged")
    floor = lab.last_count(app.ref.pid)
    path = lab.ok("checkpoint", "damaged", "--leave-running", "--name", "d").strip()
    out = Outcome(("checkpoint", "damaged", "--name", "d", "--leave-running"), 0, path, "")
    committed = lab.home / "images" / "d"
    assert path == str(committed), path
    (committed / "torpor.json").write_text("{")  # what a fault must never leave
    _raises(
        lambda: survived(
            lab, app, out, image="d", committed=committed, floor=floor, leave_running=True
        ),
        "lists broken images",
    )
