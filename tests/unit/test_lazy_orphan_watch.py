"""A lazy copy whose watch thread cannot start (``threading.Thread.start`` raising, as it does
with ``RuntimeError: can't start new thread``) is not left running unwatched with the keeper
held for ever: the copy is killed, the hold released, its daemon stopped and why recorded."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from torpor._images._image import Image
from torpor._lazy import _restore as lazy
from torpor._process._proc import running

from . import test_lazy_restore

criu = test_lazy_restore.criu  # the fake CRIU (fixtures)
image = test_lazy_restore.image
copy = test_lazy_restore.copy


def test_a_watch_that_cannot_start_kills_the_copy_and_lets_the_keeper_go(
    image: Image, criu: str, copy: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LAZY", "hang")
    held: list[str] = []
    ended: list[str] = []
    failed: list[lazy.LazyState] = []

    @contextmanager
    def hold() -> Iterator[None]:
        held.append("in")
        yield
        held.append("out")

    c = lazy.LazyCopy(image, "app", binary=criu, hold=hold, on_failure=failed.append)
    c._on_end = lambda: ended.append("end")
    c.start()
    c.restored(copy.pid, tasks=0)
    daemon = c.daemon_pid
    assert daemon is not None and running(daemon)

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", no_thread)
        c.watch()  # not raised: the keeper goes on with the restore's other copies
    assert held == ["in", "out"] and ended == ["end"]
    assert c.wait(0)
    assert copy.wait(5) == -signal.SIGKILL
    assert not running(daemon)
    st = lazy.read_state("app")
    assert st is not None and st.state == "failed"
    assert st.error == (
        f"lazy restore of {image.path}: the keeper could not start the thread that watches "
        "the copy (can't start new thread); free threads or memory and restore again; "
        f"copy app (pid {copy.pid}) was killed"
    )
    assert [f.state for f in failed] == ["failed"]
    assert isinstance(c.work_dir, Path) and c.work_dir.exists()  # its logs are kept


def test_a_copy_whose_failing_watch_fails_too_does_not_leave_the_next_unwatched() -> None:
    watched: list[str] = []

    class Copy:
        def __init__(self, name: str, fails: bool) -> None:
            self.name, self.fails = name, fails

        def watch(self) -> None:
            watched.append(self.name)
            if self.fails:  # its ``_unwatched``, printing to a broken stderr
                raise OSError(5, "Input/output error")

    copies = object.__new__(lazy.LazyCopies)
    copies.copies = [Copy("a", True), Copy("b", False)]  # type: ignore[list-item]
    copies._lock = threading.Lock()
    copies.watch()
    assert watched == ["a", "b"]
