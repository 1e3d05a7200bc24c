"""Pre-flight's checks on the target (``_preflight.problems``) against malformed and hostile
messages, and the facts the source gathers from /proc (``open_files``). No root, no CRIU: the
target's CRIU version and CRIU's cpuinfo verdict are stand-ins here (the real ones are checked
on a lab in tests/migration/test_migrate_preflight.py)."""

from __future__ import annotations

import base64
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from torpor._engine import _cpuinfo
from torpor._migrate import _preflight

WHERE = "10.0.0.2:7070"


def varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def cpuinfo_img(entry: bytes | None = None, *, top: bytes | None = None) -> bytes:
    """A cpuinfo.img as CRIU writes it: magics, the entry's length, one x86 entry."""
    if entry is None:
        entry = b"".join(
            [field(1, 1), field(2, 6), field(3, 207), field(4, 2), field(5, 2)]
            + [field(6, w) for w in (0x1F8BFBFF, 0x2C100800, 0)]
            + [field(7, b"Test CPU"), field(8, 0xE5), field(9, 2696), field(10, 2696)]
        )
    body = field(1, entry) if top is None else top
    return struct.pack("<III", _cpuinfo.IMG_COMMON_MAGIC, _cpuinfo.CPUINFO_MAGIC, len(body)) + body


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """A target home, its CRIU 4.2.1, a CPU that takes every cpuinfo; returns the cpuinfo
    images handed to the (stand-in) CRIU check."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("TORPOR_HOME", str(home))
    monkeypatch.setattr(_preflight, "criu_version", lambda: "4.2.1")
    checked: list[bytes] = []

    def check(data: bytes) -> list[str]:
        checked.append(data)
        return []

    monkeypatch.setattr(_cpuinfo, "check", check)
    return checked


def message(**over: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": "preflight",
        "mode": "copy",
        "name": "ctr",
        "criu": "4.2.1",
        "kernel": "1.0",
        "rss_bytes": 1 << 20,
        "cpuinfo": base64.b64encode(cpuinfo_img()).decode(),
        "files": [],
    }
    msg.update(over)
    return msg


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_sound_message_passes_and_its_cpuinfo_reaches_the_check(target: list[bytes]) -> None:
    assert _preflight.problems(message(), where=WHERE) == []
    assert target == [cpuinfo_img()]


def test_criu_refusing_the_cpu_names_the_target_and_both_cpus(
    target: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    line = "arch/x86/cpu.c:223: cpu: CPU instruction capabilities do not match run time"
    monkeypatch.setattr(_cpuinfo, "check", lambda data: [line])
    monkeypatch.setattr(_cpuinfo, "this_cpu", lambda: "Old CPU")
    assert _preflight.problems(message(), where=WHERE) == [
        f"the CPU of {WHERE} (Old CPU) lacks a feature the process may use on the source's "
        f"(Test CPU): CRIU's cpuinfo check says: {line}"
    ]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (None, "the pre-flight message lacks the source's CPU description (cpuinfo)"),
        (7, "the pre-flight message lacks the source's CPU description (cpuinfo)"),
        ("A" * 6000, "the pre-flight message lacks the source's CPU description (cpuinfo)"),
        ("not base64!", "the pre-flight message's CPU description (cpuinfo) is not base64"),
        (b64(b""), "the cpuinfo image is truncated"),
        (b64(b"\x00" * 12), "the cpuinfo image does not start with CRIU's cpuinfo magic"),
        (b64(cpuinfo_img()[:-1]), "the cpuinfo image's entry length does not match its size"),
        (b64(cpuinfo_img() + b"\x00"), "the cpuinfo image's entry length does not match its size"),
        (
            b64(cpuinfo_img(top=field(1, b"") + field(1, b""))),
            "the cpuinfo image does not hold exactly one x86 CPU entry",
        ),
        (
            b64(cpuinfo_img(top=field(2, b"ppc"))),
            "the cpuinfo image does not hold exactly one x86 CPU entry",
        ),
        (
            b64(cpuinfo_img(field(1, 1) + field(11, 5))),
            "the cpuinfo image has an unknown field 11 (wire 0)",
        ),
        (
            b64(cpuinfo_img(field(1, b"x"))),
            "the cpuinfo image has an unknown field 1 (wire 2)",
        ),
        (b64(cpuinfo_img(field(1, 1))), "the cpuinfo image lacks fields [2, 3, 4, 5]"),
        (
            b64(cpuinfo_img(b"".join(field(n, 1) for n in (1, 2, 3, 4, 5, 2)))),
            "the cpuinfo image repeats field 2",
        ),
        (
            b64(cpuinfo_img(b"".join(field(n, 3 if n == 1 else 1) for n in range(1, 6)))),
            "the cpuinfo image names an unknown CPU vendor 3",
        ),
        (
            b64(cpuinfo_img(b"".join(field(n, 1) for n in range(1, 6)) + field(6, 1 << 32))),
            "the cpuinfo image's capability words are out of range",
        ),
        (
            b64(cpuinfo_img(b"".join(field(n, 1) for n in range(1, 6)) * 1 + field(6, 1) * 65)),
            "the cpuinfo image's capability words are out of range",
        ),
        (
            b64(cpuinfo_img(b"".join(field(n, 1) for n in range(1, 6)) + field(7, b"\xff"))),
            "the cpuinfo image's model name is not ASCII",
        ),
        (
            b64(cpuinfo_img(b"".join(field(n, 1) for n in range(1, 6)) + field(7, b"a\nb"))),
            "the cpuinfo image's model name is not a printable line",
        ),
        (
            b64(cpuinfo_img(top=b"\x0a\xff\xff\xff\xff\x0f")),
            "the cpuinfo image has a field running past its end",
        ),
        (
            b64(cpuinfo_img(top=b"\x08" + b"\xff" * 11)),
            "the cpuinfo image has a truncated or overlong number",
        ),
        (
            b64(cpuinfo_img(top=b"\x0d\x00\x00\x00\x00")),
            "the cpuinfo image has a field of wire type 5",
        ),
        (b64(cpuinfo_img(top=b"\x00\x00")), "the cpuinfo image has a field numbered 0"),
        (b64(cpuinfo_img().ljust(4097, b"\x00")), "is over 4096"),
    ],
)
def test_a_malformed_cpuinfo_is_refused_before_criu_reads_it(
    target: list[bytes], raw: object, problem: str
) -> None:
    found = _preflight.problems(message(cpuinfo=raw), where=WHERE)
    assert target == []  # CRIU never saw it
    assert len(found) == 1
    if problem.startswith("the pre-flight"):
        assert found == [problem]
    elif problem == "is over 4096":
        assert found[0].startswith(f"the source's CPU description is refused on {WHERE}: ")
        assert found[0].endswith(": the cpuinfo image is 4097 bytes, over 4096")
    else:
        assert found == [f"the source's CPU description is refused on {WHERE}: {problem}"]


def fact(path: Path | str, **over: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": str(path), "kind": "file", "mode": 0o100600}
    entry.update({"size": 0, "sized": True}, **over)
    return entry


@pytest.mark.parametrize(
    "entry",
    [
        "a string",
        {"path": "/etc/hostname"},
        {**fact("/etc/hostname"), "extra": 1},
        fact("etc/hostname"),
        fact("/etc/\0hostname"),
        fact("/etc/../etc/hostname"),
        fact("/" + "a" * 5000),
        fact("/etc/hostname", kind="fifo"),
        fact("/etc/hostname", size=-1),
        fact("/etc/hostname", size=True),
        fact("/etc/hostname", size="3"),
        fact("/etc/hostname", mode=None),
        fact("/etc/hostname", sized=1),
        fact(7),
    ],
)
def test_a_malformed_file_fact_is_refused(target: list[bytes], entry: object) -> None:
    found = _preflight.problems(message(files=[entry]), where=WHERE)
    assert found == [f"the pre-flight message describes a file badly: {str(entry)[:200]!r}"]


@pytest.mark.parametrize("files", [None, "x", {"path": "/"}, [fact("/")] * 1025])
def test_a_message_without_a_sound_file_list_is_refused(target: list[bytes], files: object) -> None:
    assert _preflight.problems(message(files=files), where=WHERE) == [
        "the pre-flight message lacks a list of the process's files"
    ]


def test_each_file_that_differs_is_named(target: list[bytes], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"12345")
    log = tmp_path / "log"
    log.write_bytes(b"123")
    link = tmp_path / "link"
    link.symlink_to(data)
    files = [
        fact(data, size=5),  # as the process has it
        fact(tmp_path / "gone"),
        fact(data, size=9),
        fact(log, size=1, sized=False),  # appended to: CRIU does not check its size
        fact(link, size=5),
        fact(tmp_path, size=5),
        fact(tmp_path, kind="dir"),
        fact(data, kind="dir"),
    ]
    assert _preflight.problems(message(files=files), where=WHERE) == [
        f"{tmp_path / 'gone'} is missing on {WHERE}",
        f"{data} is 5 bytes on {WHERE}, 9 where the process has it open (CRIU refuses a file "
        "whose size changed)",
        f"{link} is a symlink on {WHERE}",
        f"{tmp_path} is not a regular file on {WHERE}",
        f"{data} is not a directory on {WHERE}",
    ]


def test_many_differing_files_are_counted_past_eight(target: list[bytes], tmp_path: Path) -> None:
    files = [fact(tmp_path / f"gone{i}") for i in range(11)]
    found = _preflight.problems(message(files=files), where=WHERE)
    assert found == [
        *(f"{tmp_path / f'gone{i}'} is missing on {WHERE}" for i in range(8)),
        f"and 3 more files differ on {WHERE}",
    ]


@pytest.mark.parametrize("rss", [None, -1, True, "1", 1.5])
def test_a_message_without_a_sound_size_is_refused(target: list[bytes], rss: object) -> None:
    assert _preflight.problems(message(rss_bytes=rss), where=WHERE) == [
        "the pre-flight message gives no process size"
    ]


def test_more_memory_than_the_target_has_available_is_refused(
    target: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_preflight, "mem_available", lambda: 100 << 20)
    assert _preflight.problems(message(rss_bytes=101 << 20), where=WHERE) == [
        f"{WHERE} has 100 MiB of memory available; the process's resident size is 101 MiB"
    ]
    assert _preflight.problems(message(rss_bytes=100 << 20), where=WHERE) == []


def test_mem_available_reads_meminfo() -> None:
    with open("/proc/meminfo") as f:
        line = next(x for x in f if x.startswith("MemAvailable:"))
    now = _preflight.mem_available()
    assert now is not None
    assert abs(now - int(line.split()[1]) * 1024) < 256 << 20  # read moments apart


def test_open_files_describes_what_criu_will_look_for(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"abc")
    log = tmp_path / "app.log"
    gone = tmp_path / "gone"
    gone.write_bytes(b"x")
    fds = [
        os.open(data, os.O_RDWR),
        os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
        os.open(gone, os.O_RDONLY),
    ]
    os.unlink(gone)
    try:
        found = {e["path"]: e for e in _preflight.open_files(os.getpid())}
    finally:
        for fd in fds:
            os.close(fd)
    assert found[str(data)] == {
        "path": str(data),
        "kind": "file",
        "mode": os.stat(data).st_mode,
        "size": 3,
        "sized": True,
    }
    assert found[str(log)]["sized"] is False  # write-only, appending: CRIU skips its size
    assert str(gone) not in found and f"{gone} (deleted)" not in found  # a ghost in the image
    assert found[os.getcwd()]["kind"] == "dir"
    exe = os.readlink("/proc/self/exe")
    assert (found[exe]["kind"], found[exe]["size"]) == ("file", os.stat(exe).st_size)
    # What this host has is what the process has: no problem here.
    assert _preflight._file_problems(list(found.values()), WHERE) == []


# -- mode pool: the source's pool found here by its marker -----------------------------------------


NO_POOL = "the pre-flight message does not say which pool the image goes through"
BAD_POOL = "the pre-flight message names its pool badly"
MARKER = "0" * 64


@pytest.mark.parametrize(
    ("ident", "problem"),
    [
        (None, NO_POOL),
        ({"name": "p", "driver": "dir"}, NO_POOL),
        ({"name": "p", "driver": "dir", "marker": MARKER, "x": 1}, NO_POOL),
        ({"name": 1, "driver": "dir", "marker": MARKER}, BAD_POOL),
        ({"name": "p", "driver": "dir", "marker": MARKER[1:]}, BAD_POOL),
        ({"name": "p", "driver": "dir", "marker": "G" * 64}, BAD_POOL),
        ({"name": "p" * 65, "driver": "dir", "marker": MARKER}, BAD_POOL),
        ({"name": "p", "driver": "d" * 17, "marker": MARKER}, BAD_POOL),
    ],
)
def test_a_malformed_pool_identity_is_refused(
    target: list[bytes], ident: object, problem: str
) -> None:
    assert _preflight.problems(message(mode="pool", pool=ident), where=WHERE) == [problem]


def test_the_source_pool_is_found_by_its_marker_and_another_is_not(target: list[bytes]) -> None:
    from torpor._migrate import _viapool
    from torpor._pools import open_pool

    with open_pool("default") as pool:  # this home's: its marker is written on first open
        ident = _viapool.identity(pool, "dir")
    assert _preflight.problems(message(mode="pool", pool=ident), where=WHERE) == []
    assert _viapool.local_pool(ident, where=WHERE) == ("default", [])
    other = {**ident, "name": "shared", "marker": "0" * 64}
    assert _preflight.problems(message(mode="pool", pool=other), where=WHERE) == [
        f"no pool configured on {WHERE} is the source's pool 'shared' (dir): configure it "
        "there (torpor pool create) where it can be read"
    ]


# -- mode pool: what the target restores ---------------------------------------------------


class FakeConn:
    """The channel as serve_pool uses it: messages to receive, messages sent."""

    def __init__(self, *msgs: dict[str, Any]) -> None:
        self.msgs, self.sent = list(msgs), []  # type: list[dict[str, Any]], list[dict[str, Any]]

    def recv(self) -> dict[str, Any]:
        return self.msgs.pop(0)

    def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)


class FakeIncoming:
    """The server's side of one migration (``_serve._Incoming``), its restore recorded."""

    def __init__(self, conn: FakeConn) -> None:
        self.conn, self.where, self.peer = conn, WHERE, "a"
        self.outcome: str | None = None
        self.lines: list[str] = []
        self.restored: list[tuple[Path, str, bool]] = []

    def log(self, line: str) -> None:
        self.lines.append(line)

    def _restore(self, image: Any, name: str) -> None:
        self.restored.append((image.path, name, image.path.is_dir()))
        self.outcome = f"{name!r} restored"


@pytest.fixture
def pushed(target: list[bytes], tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """An image pushed into this home's default pool as ``ctr.migrate-1``: the pool's
    identity and the image's files' SHA-256."""
    from torpor._migrate import _viapool
    from torpor._pools import open_pool

    from .test_pool_support import make_image, random_pages

    image = make_image(tmp_path / "made", "ctr", bytes(random_pages(8)))
    with open_pool("default") as pool:
        pool.push(image, "ctr.migrate-1")
        ident = _viapool.identity(pool, "dir")
    return ident, {f.name: f.sha256 for f in image.manifest.files}


def test_the_target_restores_the_pushed_image_and_drops_its_pulled_copy(
    pushed: tuple[dict[str, str], dict[str, str]],
) -> None:
    from torpor._migrate import _viapool

    ident, files = pushed
    incoming = FakeIncoming(
        FakeConn({"type": "restore", "record": "ctr.migrate-1", "files": files})
    )
    _viapool.serve_pool(incoming, "ctr", {"pool": ident})  # type: ignore[arg-type]
    [(path, name, there)] = incoming.restored
    assert (name, there) == ("ctr", True)
    assert not path.exists()  # only in transit
    assert incoming.lines[-1] == "'ctr' restored"


DIFFER = "ctr.migrate-1@default is not the image a pushed: its files differ"


@pytest.mark.parametrize(
    ("record", "change", "error"),
    [
        ("ctr.migrate-1", "core-1.img", DIFFER),
        ("ctr.migrate-1", "extra.img", DIFFER),
        ("other.migrate-1", None, "a named a record 'other.migrate-1' not of 'ctr'"),
        ("ctr", None, "a named a record 'ctr' not of 'ctr'"),
    ],
)  # fmt: skip
def test_the_target_refuses_another_image_than_the_one_pushed(
    pushed: tuple[dict[str, str], dict[str, str]], record: str, change: str | None, error: str
) -> None:
    from torpor._errors import TorporError
    from torpor._migrate import _viapool

    ident, files = pushed
    if change is not None:
        files = {**files, change: "0" * 64}
    conn = FakeConn({"type": "restore", "record": record, "files": files})
    incoming = FakeIncoming(conn)
    with pytest.raises(TorporError) as caught:
        _viapool.serve_pool(incoming, "ctr", {"pool": ident})  # type: ignore[arg-type]
    assert caught.value.msg == error
    assert conn.sent == [{"type": "failed", "error": error}]
    assert incoming.restored == []


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "image"},
        {"type": "restore", "record": 1, "files": {}},
        {"type": "restore", "record": "ctr.migrate-1", "files": []},
    ],
)
def test_the_target_refuses_a_malformed_restore_message(
    pushed: tuple[dict[str, str], dict[str, str]], msg: dict[str, Any]
) -> None:
    from torpor._migrate import _viapool
    from torpor._migrate._channel import ChannelError

    incoming = FakeIncoming(FakeConn(msg))
    with pytest.raises(ChannelError):
        _viapool.serve_pool(incoming, "ctr", {"pool": pushed[0]})  # type: ignore[arg-type]
    assert incoming.restored == []
