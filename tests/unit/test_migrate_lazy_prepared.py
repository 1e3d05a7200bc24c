"""What the lazy target does ahead of the downtime, and what it no longer waits for in it:

- its keeper is forked before the image arrives (``_lazy_target.Prepared``, from
  ``serve_lazy``), receives the sealed image and the relay's socket once they are there, and
  ends having restored nothing when no image comes;
- the gratuitous ARP (``_address.announce``) never waits for its packet socket's close, which
  waits for an RCU grace period in the kernel (30-60 ms measured on this project's VM), and
  its socket is hooked nowhere (bound for ARP, the bind itself waited ~10 ms).

No root, no CRIU: the keeper's fork is real (``Apart``), the keeper and its work are fakes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor._errors import TorporError
from torpor._migrate import _address, _lazy, _lazy_target
from torpor._migrate._address import Link
from torpor._migrate._channel import ChannelError
from torpor._process import _keeper
from torpor._process._registry import ManagedProcess


def _rec(name: str, pid: int) -> ManagedProcess:
    return ManagedProcess(
        name=name, pid=pid, start_time=1, keeper_pid=os.getpid(), command=("app",), started="now"
    )


class _Image:
    """What crosses to the keeper: picklable, as the real Image is."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)


@pytest.fixture
def fake_keeper(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The fork's keeper runs its work in the forked child itself; the work, once handed an
    image, writes its path and a byte through the socket it got, and reports a record."""
    marks = tmp_path / "worked"

    def spawn(work: Callable[[Any], list[ManagedProcess]]) -> list[ManagedProcess]:
        return work(None)

    def work(image: Any, name: str, ps_fd: int, source: str) -> Callable[[Any], Any]:
        def run(k: Any) -> list[ManagedProcess]:
            marks.write_text(f"{image.path} {source}")
            with socket.socket(fileno=ps_fd) as s:
                s.sendall(b"K")
            return [_rec(name, 4242)]

        return run

    monkeypatch.setattr(_keeper, "spawn", spawn)
    monkeypatch.setattr(_lazy_target, "_work", work)
    return marks


def _gone(pid: int) -> bool:
    """``pid``, a child of ours, has been reaped."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_prepared_keeper_is_forked_first_and_waits_for_the_image(fake_keeper: Path) -> None:
    prepared = _lazy_target.Prepared("app", source="peer-a")
    try:
        time.sleep(0.2)
        assert not fake_keeper.exists()  # forked, waiting: nothing restored before the image
        ours, theirs = socket.socketpair()
        with ours, theirs:
            rec = prepared.restore(_Image("/images/app.migrating-1"), theirs.fileno())  # type: ignore[arg-type]
            ours.settimeout(5)
            assert ours.recv(1) == b"K"  # the keeper wrote through the socket it was handed
        assert rec.name == "app" and rec.pid == 4242
        assert fake_keeper.read_text() == "/images/app.migrating-1 peer-a"
        assert _gone(prepared._apart.pid)  # reaped
    finally:
        prepared.cancel()


def test_prepared_keeper_cancelled_restores_nothing(fake_keeper: Path) -> None:
    prepared = _lazy_target.Prepared("app", source="peer-a")
    pid = prepared._apart.pid
    started = time.monotonic()
    prepared.cancel()
    assert time.monotonic() - started < 5
    assert _gone(pid)
    assert not fake_keeper.exists()
    with pytest.raises(TorporError, match="cancelled"):
        prepared.restore(_Image("/x"), 0)  # type: ignore[arg-type]
    prepared.cancel()  # twice: nothing more


def test_prepared_keeper_without_an_image_says_so(fake_keeper: Path) -> None:
    """The real waiting work, handed the socket's end: the error names the migration."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.close()
    with pytest.raises(TorporError, match="ended before its image came"):
        _lazy_target._waiting(b.detach(), "app", "peer-a")(None)  # type: ignore[arg-type]


class _Incoming:
    def __init__(self, events: list[str], fail: bool) -> None:
        self.events, self.fail, self.peer = events, fail, "peer-a"

    @contextlib.contextmanager
    def receiving(self, name: str) -> Iterator[str]:
        self.events.append("receiving")
        if self.fail:
            raise ChannelError("the source sent nothing")
        yield "image"


@pytest.mark.parametrize("fail", [False, True])
def test_serve_lazy_forks_the_keeper_before_the_image(
    monkeypatch: pytest.MonkeyPatch, fail: bool
) -> None:
    events: list[str] = []

    class Prepared:
        def __init__(self, name: str, *, source: str) -> None:
            events.append(f"prepared {name} {source}")

        def cancel(self) -> None:
            events.append("cancel")

    def run(self: Any) -> None:
        assert isinstance(self.keeper, Prepared) and self.image == "image"
        events.append("run")

    monkeypatch.setattr(_lazy_target, "Prepared", Prepared)
    monkeypatch.setattr(_lazy._Filling, "run", run)
    incoming = _Incoming(events, fail)
    with contextlib.nullcontext() if not fail else pytest.raises(ChannelError):
        _lazy.serve_lazy(incoming, "app", {})  # type: ignore[arg-type]
    middle = ["receiving"] if fail else ["receiving", "run"]
    assert events == ["prepared app peer-a", *middle, "cancel"]


# -- the gratuitous ARP ----------------------------------------------------------------------


class _PacketSocket:
    instances: list[_PacketSocket] = []

    def __init__(self, family: int, kind: int, proto: int = 0) -> None:
        self.args = (family, kind, proto)
        self.sent: list[tuple[bytes, Any]] = []
        self.bound = False
        self.release = threading.Event()
        self.closed_in: threading.Thread | None = None
        _PacketSocket.instances.append(self)

    def bind(self, addr: Any) -> None:
        self.bound = True

    def send(self, data: bytes) -> int:
        raise AssertionError("a frame must name its link (sendto)")

    def sendto(self, data: bytes, addr: Any) -> int:
        self.sent.append((data, addr))
        return len(data)

    def close(self) -> None:
        self.release.wait(5)  # the kernel's grace period, made long
        self.closed_in = threading.current_thread()


def test_announce_does_not_wait_for_the_packet_socket_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _PacketSocket.instances.clear()
    monkeypatch.setattr(socket, "socket", _PacketSocket)
    link = Link("eth0", 2, b"\x02" * 6, True, ())
    started = time.monotonic()
    assert _address.announce(_address.parse("10.0.0.150/24"), link)
    took = time.monotonic() - started
    (sock,) = _PacketSocket.instances
    try:
        assert took < 1.0  # the close waits 5 s here
        assert sock.args == (socket.AF_PACKET, socket.SOCK_RAW, 0)  # hooked nowhere
        assert not sock.bound
        assert [addr for _, addr in sock.sent] == [("eth0", 0x0806)] * 2
        ip = bytes([10, 0, 0, 150])
        assert [data for data, _ in sock.sent] == [
            _address.garp_frame(b"\x02" * 6, ip, 1),
            _address.garp_frame(b"\x02" * 6, ip, 2),
        ]
    finally:
        sock.release.set()
    deadline = time.monotonic() + 5
    while sock.closed_in is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sock.closed_in is not None and sock.closed_in is not threading.main_thread()


def test_prepared_keeper_gets_an_image_bigger_than_a_socket_message(
    fake_keeper: Path,
) -> None:
    """An image of thousands of files (a tree of hundreds of processes, a process of
    thousands of threads) is described in more bytes than one SOCK_SEQPACKET message holds
    (``net.core.wmem_default``): it still crosses, whole."""
    wmem = int(Path("/proc/sys/net/core/wmem_default").read_text())
    name = "/images/app.migrating-1/" + "x" * (3 * wmem)
    prepared = _lazy_target.Prepared("app", source="peer-a")
    try:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            rec = prepared.restore(_Image(name), theirs.fileno())  # type: ignore[arg-type]
        assert rec.pid == 4242
        assert fake_keeper.read_text() == f"{name} peer-a"
    finally:
        prepared.cancel()


class _Copy:
    """The lazy copy as ``_work`` drives it: what was done to it, in order."""

    done: list[str]

    def __init__(self, *_: Any, **__: Any) -> None:
        self.server = None

    def start(self) -> None:
        self.done.append("start")

    def engine(self, engine: Any) -> Any:
        return engine

    def restored(self, pid: int, *, tasks: int) -> None:
        self.done.append("restored")

    def watch(self) -> None:
        self.done.append("watch")

    def abort(self) -> None:
        self.done.append("abort")


@pytest.mark.parametrize("fails", ["record", "watch"])
def test_a_lazy_target_copy_whose_record_or_watch_fails_is_killed_and_its_daemon_stopped(
    monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """After CRIU restored the copy, a record that cannot be written (a full disk) or a
    watch that cannot start: the copy is killed (it must never run unwatched on memory that
    may not come) and its daemon and page server stopped (never left serving)."""
    done: list[str] = []

    class Copy(_Copy):
        def watch(self) -> None:
            super().watch()
            if fails == "watch":
                raise OSError(28, "No space left on device")

    Copy.done = done

    class Engine:
        binary = "criu"

        def restore(self, path: Any, options: Any) -> Any:
            return type("Res", (), {"pid": 4242})()

    class Keeper:
        pid = os.getpid()
        holding = None

        def _adopt(self, rec: ManagedProcess) -> None:
            done.append("adopt")

        def record(self, recs: Any, held: Any) -> list[ManagedProcess]:
            if fails == "record":
                raise OSError(28, "No space left on device")
            done.append("record")
            return list(recs)

        def discard(self, recs: Any) -> None:
            done.append(f"discard {recs[0].pid}")

    @contextlib.contextmanager
    def reserve(names: Any) -> Iterator[None]:
        yield None

    class Copies:
        stdio = ()

        def __init__(self, *_: Any) -> None:
            pass

    image = type("Img", (), {"trusted": lambda self: True, "path": Path("/i")})()
    image.manifest = type("M", (), {"tcp_established": True, "shell_job": False, "cmdline": ()})
    monkeypatch.setattr(_lazy_target._lazy, "LazyCopy", Copy)
    monkeypatch.setattr(_lazy_target._lazy, "restored_tasks", lambda pid: 1)
    monkeypatch.setattr(_lazy_target, "CriuEngine", Engine)
    monkeypatch.setattr(_lazy_target._copies, "Copies", Copies)
    monkeypatch.setattr(_lazy_target._registry, "reserve", reserve)
    monkeypatch.setattr(_lazy_target._registry, "managed_name", lambda pid: None)
    monkeypatch.setattr(_keeper, "_start_time", lambda pid: 1)
    monkeypatch.setattr(_keeper, "_continue_tree", lambda pid: done.append("continue"))
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(OSError, match="No space left"):
        _lazy_target._work(image, "app", w, "peer-a")(Keeper())  # type: ignore[arg-type]
    before = ["start", "restored", "adopt"]
    after = ["discard 4242", "abort"]
    middle = [] if fails == "record" else ["record", "watch"]
    assert done == before + middle + after
