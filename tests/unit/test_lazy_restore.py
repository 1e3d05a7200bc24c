"""The orchestration of a lazy restore (``torpor._lazy._restore``) on fakes: a fake ``criu``
whose ``lazy-pages`` behaves as told (ready, then exit 0 / killed / exit 1 with an error line,
or never ready), a real child process standing in for the restored copy, a fake page server.

What is proved: a daemon that ends well makes the copy ``resident`` (and its work dir goes);
one that ends otherwise, or a page server error, kills the copy (through its pidfd) and
records why, once; the keeper is held while a watch runs; a daemon that never gets ready
fails the start with its log's line; a planted state is not believed.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from torpor._images._image import Image
from torpor._lazy import _restore as lazy
from torpor._lazy import _state, _warm
from torpor._lazy._daemon import LazyDaemonError
from torpor._lazy._source import LazyPageError, Range

from .test_pool_support import make_image

FAKE_CRIU = f"""#!{sys.executable}
import os, sys, time
args = sys.argv[1:]
assert args[0] == "lazy-pages", args
fd = int(args[args.index("--status-fd") + 1])
work = args[args.index("-W") + 1]
log = os.path.join(work, args[args.index("-o") + 1])
mode = os.environ["FAKE_LAZY"]
with open(os.path.join(work, "argv"), "w") as fh:
    fh.write("\\n".join(args))
if mode == "never-ready":
    open(log, "w").write("(00.001) Error (criu/uffd.c:1): cannot listen\\n")
    sys.exit(1)
os.write(fd, b"\\0")
os.close(fd)
if mode == "exit0":
    time.sleep(0.2)
    sys.exit(0)
if mode == "exit1":
    time.sleep(0.2)
    open(log, "w").write("(00.2) Error (criu/uffd.c:9): page read failed\\n")
    sys.exit(1)
time.sleep(60)  # "hang": killed by the test, or by the orchestration
"""


@pytest.fixture
def criu(tmp_path: Path) -> str:
    path = tmp_path / "criu"
    path.write_text(FAKE_CRIU)
    path.chmod(stat.S_IRWXU)
    return str(path)


@pytest.fixture
def image(tmp_path: Path, torpor_home: Path) -> Image:
    return make_image(tmp_path / "images", "app", os.urandom(4 * 4096))


@pytest.fixture
def copy() -> Iterator[subprocess.Popen[bytes]]:
    """A real child process standing in for the restored root."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class FakeServer:
    """A page server that fails (``LazyPageError``) when told to, calling ``on_error`` first
    and recording whether the copy was already dead by then."""

    def __init__(
        self, daemon_pid: Callable[[], int | None], on_error: Callable[[LazyPageError], None]
    ) -> None:
        self.daemon_pid = daemon_pid
        self.on_error = on_error
        self.port = 4242
        self.error: LazyPageError | None = None
        self.closed = False

    def start(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def warm_set(self, *, within: float | None = None) -> list[Range]:
        return []

    def prefetch(self, ranges: list[Range]) -> None:
        self.prefetched = ranges

    def fail(self) -> None:
        err = LazyPageError(
            "image 'app' (/x): file pages-1.img chunk 3 (sha256 ab) does not match its SHA-256",
            image="/x",
            file="pages-1.img",
            chunk="3 (sha256 ab)",
        )
        self.error = err
        self.on_error(err)


def _copy(image: Image, criu: str, **kw: object) -> lazy.LazyCopy:
    return lazy.LazyCopy(image, "app", binary=criu, **kw)  # type: ignore[arg-type]


def _started(c: lazy.LazyCopy, proc: subprocess.Popen[bytes]) -> lazy.LazyCopy:
    c.start()
    c.restored(proc.pid, tasks=0)
    c.watch()
    return c


def test_daemon_exit_0_makes_the_copy_resident_and_removes_the_work_dir(
    image: Image, criu: str, copy: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LAZY", "exit0")
    c = _started(_copy(image, criu), copy)
    assert c.work_dir is not None
    argv = (c.work_dir / "argv").read_text().split("\n")
    assert argv[:5] == ["lazy-pages", "-D", argv[2], "-W", str(c.work_dir)]
    assert argv[2].startswith("/proc/self/fd/")
    assert lazy.read_state("app").state == "filling"  # type: ignore[union-attr]
    assert c.wait(10)
    st = lazy.read_state("app")
    assert st is not None and st.state == "resident" and st.error is None
    assert st.resident_at is not None and st.resumed_at is not None
    assert st.resident_at >= st.resumed_at
    assert st.pid == copy.pid and st.daemon_pid == c.daemon_pid
    assert copy.poll() is None  # still running
    assert not c.work_dir.exists()


def test_daemon_killed_kills_the_copy_and_records_why(
    image: Image, criu: str, copy: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LAZY", "hang")
    failed: list[lazy.LazyState] = []
    c = _started(_copy(image, criu, on_failure=failed.append), copy)
    assert c.daemon_pid is not None
    os.kill(c.daemon_pid, signal.SIGKILL)
    assert c.wait(10)
    assert copy.wait(5) == -signal.SIGKILL
    st = lazy.read_state("app")
    assert st is not None and st.state == "failed"
    assert st.error == (
        f"lazy restore of {image.path}: CRIU's lazy-pages daemon was killed by SIGKILL "
        f"(log: {c.work_dir}/lazy-pages.log) — restore again without --lazy, or see the log; "
        f"copy app (pid {copy.pid}) was killed"
    )
    assert failed == [st.__class__(**{**st.__dict__, "updated": failed[0].updated})]
    assert c.work_dir is not None and c.work_dir.exists()  # its logs are kept


def test_daemon_exit_1_names_its_log_line(
    image: Image, criu: str, copy: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LAZY", "exit1")
    c = _started(_copy(image, criu), copy)
    assert c.wait(10)
    assert copy.wait(5) == -signal.SIGKILL
    st = lazy.read_state("app")
    assert st is not None and st.state == "failed" and st.error is not None
    assert st.error.startswith(
        f"lazy restore of {image.path}: CRIU's lazy-pages daemon exited 1; its log says: "
        "uffd.c:9: page read failed (log: "
    )


@pytest.mark.parametrize(("mode", "ok"), [("exit0", True), ("exit1", False)])
def test_a_server_that_asks_is_told_how_the_daemon_ended(
    image: Image,
    criu: str,
    copy: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    ok: bool,
) -> None:
    """A lazy migration's relay passes the daemon's close on to the source (whose CRIU then
    kills the original) only once told the daemon exited 0: the watch tells a server that
    has ``daemon_ended``, before the copy is judged."""
    monkeypatch.setenv("FAKE_LAZY", mode)
    told: list[tuple[bool, bool]] = []

    released: list[bool] = []

    class Told(FakeServer):
        def daemon_ended(self, ok: bool) -> None:
            told.append((ok, copy.poll() is None))
            assert c.daemon is not None
            released.append(c.daemon._held == [])

    def factory(
        img: Image, pid: Callable[[], int | None], on_error: Callable[[LazyPageError], None]
    ) -> FakeServer:
        return Told(pid, on_error)

    c = _copy(image, criu, server_factory=factory)
    c.start()
    c.restored(copy.pid, tasks=0)
    assert c.daemon is not None
    c.daemon._held.append(os.open(os.devnull, os.O_RDONLY))  # a userfaultfd, say
    c.watch()
    assert c.wait(10)
    assert told == [(ok, True)]  # once, while the copy still ran
    # Every page in: the copy's userfaultfds let go before the relay is waited for (a fork
    # or munmap in the running copy would wait on them); else kept until the kill.
    assert released == [ok]
    if ok:
        assert copy.poll() is None
    else:  # killed through its pidfd: its end is seen once the kernel has reaped it
        assert copy.wait(5) == -signal.SIGKILL


def test_server_error_kills_the_copy_before_the_server_lets_go(
    image: Image, criu: str, copy: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LAZY", "hang")
    servers: list[FakeServer] = []

    def factory(
        img: Image, pid: Callable[[], int | None], on_error: Callable[[LazyPageError], None]
    ) -> FakeServer:
        servers.append(FakeServer(pid, on_error))
        return servers[0]

    c = _started(_copy(image, criu, server_factory=factory), copy)
    (server,) = servers
    assert server.daemon_pid() == c.daemon_pid  # the only peer it may serve
    assert c.work_dir is not None
    argv = (c.work_dir / "argv").read_text().split("\n")
    assert argv[-5:] == ["--page-server", "--address", "127.0.0.1", "--port", "4242"]
    server.fail()  # as the real server does: on_error returns before it closes the socket
    assert copy.poll() == -signal.SIGKILL or copy.wait(1) == -signal.SIGKILL
    assert not server.closed
    assert c.wait(10)
    assert server.closed
    st = lazy.read_state("app")
    assert st is not None and st.state == "failed"
    assert st.error == (
        "image 'app' (/x): file pages-1.img chunk 3 (sha256 ab) does not match its SHA-256; "
        f"copy app (pid {copy.pid}) was killed"
    )


def test_the_keeper_is_held_while_the_watch_runs(
    image: Image, criu: str, copy: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LAZY", "exit0")
    held: list[str] = []

    @contextmanager
    def hold() -> Iterator[None]:
        held.append("in")
        yield
        held.append("out")

    c = _started(_copy(image, criu, hold=hold), copy)
    assert held == ["in"]
    assert c.wait(10)
    deadline = time.monotonic() + 5
    while held != ["in", "out"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held == ["in", "out"]


def test_a_state_file_that_cannot_be_written_does_not_leave_the_copy_unwatched(
    image: Image, criu: str, copy: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy runs once watch() is called: a full disk writing its resume into the state
    file must not keep the watch (which kills it if its daemon fails) from starting."""
    monkeypatch.setenv("FAKE_LAZY", "exit0")
    c = _copy(image, criu)
    c.start()
    c.restored(copy.pid, tasks=0)
    write = c._write

    def full_disk() -> None:
        if c.state.resumed_at is not None and c.state.state == "filling":
            raise OSError(28, "No space left on device")
        write()

    monkeypatch.setattr(c, "_write", full_disk)
    c.watch()
    assert c.wait(10)  # watched: the daemon's exit 0 made it resident
    assert c.state.state == "resident"


def test_a_copy_made_resident_on_a_full_disk_is_not_killed(
    image: Image, criu: str, copy: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every page is in (the daemon exited 0) but its state file cannot say so: the copy
    lives (it was killed as a failed watch)."""
    monkeypatch.setenv("FAKE_LAZY", "exit0")
    c = _copy(image, criu)
    write = c._write

    def full_disk() -> None:
        if c.state.state == "resident":
            raise OSError(28, "No space left on device")
        write()

    monkeypatch.setattr(c, "_write", full_disk)
    _started(c, copy)
    assert c.wait(10)
    assert c.state.state == "resident"
    assert copy.poll() is None  # alive


def test_a_daemon_that_never_gets_ready_fails_the_start(
    image: Image, criu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LAZY", "never-ready")
    c = _copy(image, criu)
    with pytest.raises(LazyDaemonError) as info:
        c.start()
    assert str(info.value) == (
        f"lazy restore of {image.path}: CRIU's lazy-pages daemon exited 1 before the restore; "
        f"its log says: uffd.c:1: cannot listen (log: {c.work_dir}/lazy-pages.log) — restore "
        "again without --lazy, or see the log"
    )
    assert c.daemon is not None and c.daemon.proc is not None
    assert c.daemon.proc.returncode == 1


def test_a_planted_state_is_not_believed(torpor_home: Path) -> None:
    lazy.write_state(lazy.LazyState(name="x", image="/i", state="resident", resident_at=1.0))
    st = lazy.read_state("x")
    assert st is not None and st.state == "resident" and st.resident_at == 1.0
    (torpor_home / "lazy" / "x.json").write_text('{"name": "x", "state": 1}')
    assert lazy.read_state("x") is None
    (torpor_home / "lazy" / "y.json").symlink_to(torpor_home / "lazy" / "x.json")
    assert lazy.read_state("y") is None
    assert lazy.read_state("../x") is None


def test_wait_states_returns_when_the_daemon_is_gone(torpor_home: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    lazy.write_state(lazy.LazyState(name="z", image="/i", state="filling", daemon_pid=dead.pid))
    started = time.monotonic()
    got = lazy.wait_states(["z"], timeout=None)
    assert got["z"].state == "filling"  # a keeper killed mid-watch: filling for good
    assert _state._OUTCOME_GRACE <= time.monotonic() - started < _state._OUTCOME_GRACE + 2


def test_wait_states_sees_the_outcome_written_just_after_the_daemon_ended(
    torpor_home: Path,
) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    lazy.write_state(lazy.LazyState(name="z", image="/i", state="filling", daemon_pid=dead.pid))
    # The keeper reaps the daemon, then writes the outcome.
    writer = threading.Timer(
        0.3,
        lambda: lazy.write_state(
            lazy.LazyState(name="z", image="/i", state="resident", daemon_pid=dead.pid)
        ),
    )
    writer.start()
    try:
        assert lazy.wait_states(["z"], timeout=None)["z"].state == "resident"
    finally:
        writer.join()


def test_only_one_failure_is_recorded(
    image: Image, criu: str, copy: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LAZY", "hang")
    failed: list[lazy.LazyState] = []
    c = _started(_copy(image, criu, on_failure=failed.append), copy)
    threads = [threading.Thread(target=c._fail, args=(f"why {i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(failed) == 1
    assert c.daemon_pid is not None
    os.kill(c.daemon_pid, signal.SIGKILL)
    assert c.wait(10)
    assert len(failed) == 1


def test_warm_sets_are_saved_per_image_and_checked_when_loaded(image: Image) -> None:
    good = [("pages-1.img", 4096, 4096), ("pages-1.img", 0, 8192)]
    _warm.save(image, good)
    assert _warm.load(image) == good
    ident = image.manifest.id
    for bad in (
        [["pages-1.img", 4096, 4096], ["core-1.img", 0, 4096]],  # not a pages file
        [["pages-1.img", 3 * 4096, 2 * 4096]],  # beyond the file
        [["pages-1.img", 100, 4096]],  # not page-aligned
        [["pages-1.img", True, 4096]],
    ):
        assert _warm.check(image, {"image": ident, "ranges": bad}) == []
    assert _warm.check(image, {"image": "other", "ranges": [list(good[0])]}) == []
    assert _warm.check(image, {"image": ident, "ranges": [list(good[0])]}) == [good[0]]
    assert _warm.clip([("p", 0, 4096)] * 3, limit=8192) == [("p", 0, 4096)] * 2


def _warm_image_app(tmp_path: Path) -> Image:
    """An image whose pagemap has lazy pages, with a warm set naming one of them."""
    from .test_lazy_eager import _image as eager_image

    image = eager_image(tmp_path)
    _warm.save(image, [("pages-1.img", 3 * 4096, 4096)])
    return image


def test_a_warm_images_daemon_starts_before_its_pagemaps_are_worked_out(
    tmp_path: Path, torpor_home: Path, criu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon reads the task pagemaps only once the restore hands it the userfaultfds:
    it is started as soon as the warm image has the rest, and waited for once they are in."""
    from torpor._lazy import _eager

    image = _warm_image_app(tmp_path)
    monkeypatch.setenv("FAKE_LAZY", "exit0")
    seen: list[tuple[bool, bool]] = []
    fill = _eager.fill

    def watched(image: Image, into: Path, rewritten: dict[str, bytes]) -> None:
        d = c.daemon
        seen.append((d is not None and d.proc is not None, d is not None and d.spawned))
        fill(image, into, rewritten)

    monkeypatch.setattr(_eager, "fill", watched)
    c = _copy(image, criu)
    c.start()
    try:
        assert seen == [(True, True)]  # spawned, not yet waited for, while filling
        assert c.daemon is not None and not c.daemon.spawned
        assert c._warm_dir is not None and c.state.warm_bytes == 4096
        pagemap = c._warm_dir / "pagemap-4242.img"
        assert (
            not pagemap.is_symlink()
            and pagemap.read_bytes() != (image.path / "pagemap-4242.img").read_bytes()
        )
        assert c.state.daemon_pid == c.daemon.pid
        argv = (c.work_dir / "argv").read_text().split("\n") if c.work_dir else []
        assert "-v4" in argv  # still recording faults for the next warm set
    finally:
        c.abort()


def test_a_warm_image_of_no_use_restarts_the_daemon_on_the_image(
    tmp_path: Path, torpor_home: Path, criu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Daemon and restore must read the same pagemaps: if the warm image is not used after
    all (here: nothing in it is lazy), the daemon started on it is replaced by one on the
    image itself, before the restore."""
    from torpor._lazy import _eager

    image = _warm_image_app(tmp_path)
    monkeypatch.setenv("FAKE_LAZY", "hang")
    monkeypatch.setattr(_eager, "plan", lambda image, warm: None)
    c = _copy(image, criu)
    started: list[int] = []
    spawn = lazy.Daemon.spawn

    def noted(self: lazy.Daemon) -> None:
        spawn(self)
        assert self.proc is not None
        started.append(self.proc.pid)

    monkeypatch.setattr(lazy.Daemon, "spawn", noted)
    c.start()
    try:
        assert len(started) == 2 and c.daemon is not None and c.daemon.pid == started[1]
        assert c._warm_dir is None and c.state.warm_bytes is None
        assert c.state.daemon_pid == started[1]
        assert not os.path.exists(f"/proc/{started[0]}")  # the first: killed and reaped
        assert c.engine(lazy.CriuEngine(criu)).__class__ is lazy.CriuEngine  # the image itself
    finally:
        c.abort()
