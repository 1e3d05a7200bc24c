"""Fuzzing the migration server (``torpor._migrate._serve``): what a trusted but hostile peer
sends it, message by message and frame by frame.

The peer's side is a byte script read through a real :class:`~torpor._migrate._channel.Conn`
(its framing and JSON checks are the real ones; only the TLS socket under it is replaced), so
``D`` frames larger than announced, a message where file data is due, a bad frame header or a
stream cut short reach the server as they would over the network. The restore at the end is
replaced at the test boundary (:meth:`_Incoming._restore`): it records the image it was given.

Properties of ``_Incoming.handle()``, whatever the peer sends:

- it returns or raises a :class:`~torpor.TorporError` (a :class:`ChannelError` is one), never
  anything else: the server's loop survives only those;
- nothing is written outside the home, nothing is left in its images directory (no staging
  directory, no half-received image: the image was only in transit);
- a file is created only from a plain name, and none at all when any announced name is bad;
- the restore is reached only with an image that verifies and holds exactly the files
  announced, with the bytes the peer sent;
- every answer is one of the protocol's (``ready``, ``refused``, ``failed``), well formed.

And :func:`torpor._migrate._preflight.problems`, given any JSON-like dict, returns a list of
one-line strings and never raises.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from torpor import TorporError
from torpor._identity._trust import Peer
from torpor._images import _manifest
from torpor._images._image import Image, staging
from torpor._migrate import _dedup, _preflight, _serve
from torpor._migrate._channel import _HEADER, MAX_DATA, MAX_MESSAGE, ChannelError, Conn
from torpor._safe import is_plain_name

from .support import (
    EVIL,
    HOSTILE_INTS,
    HOSTILE_NAMES,
    JSON_VALUES,
    Jail,
    bounded,
    mutated_json,
    scaled,
    verdict,
)

PEER = Peer(name="peer-a", fingerprint="sha256:" + "0" * 64, cert_der=None, added=0, via="test")
WHERE = "target:7070"
ANSWER_TYPES = {"ready", "refused", "failed"}  # "running" only comes from the restore, replaced

# -- the peer's side: a byte script ---------------------------------------------------------------


class ScriptSocket:
    """Stands for the TLS socket under a :class:`Conn`: ``recv`` reads the peer's bytes (then
    end of stream), ``sendall`` keeps what the server answered."""

    def __init__(self, script: bytes) -> None:
        self.script = script
        self.pos = 0
        self.sent = bytearray()

    def recv(self, n: int) -> bytes:
        chunk = self.script[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def settimeout(self, seconds: float | None) -> None:
        pass

    def close(self) -> None:
        pass


def frame(kind: bytes, body: bytes) -> bytes:
    """One frame as the channel writes it (the length as given, however wrong)."""
    return _HEADER.pack(kind, len(body)) + body


def message(obj: Any) -> bytes:
    """A JSON ``M`` frame (NaN allowed, lone surrogates escaped, as a hostile peer may send)."""
    return frame(b"M", json.dumps(obj).encode())


def answers(sent: bytes) -> list[dict[str, Any]]:
    """The server's answers, each checked to be an ``M`` frame holding a JSON object."""
    out = []
    pos = 0
    while pos < len(sent):
        kind, length = _HEADER.unpack_from(sent, pos)
        assert kind == b"M", f"the server sent a {kind!r} frame"
        body = sent[pos + _HEADER.size : pos + _HEADER.size + length]
        assert len(body) == length, "the server sent a truncated frame"
        msg = json.loads(body)
        assert isinstance(msg, dict)
        out.append(msg)
        pos += _HEADER.size + length
    return out


def check_answers(got: list[dict[str, Any]]) -> None:
    """Only the protocol's answers, well formed; nothing after a refusal or a failure."""
    types = [a.get("type") for a in got]
    assert set(types) <= ANSWER_TYPES, f"answers outside the protocol: {types}"
    assert types.count("ready") <= 1
    assert "failed" not in types or types[0] == "ready", f"a failure before ready: {types}"
    for i, a in enumerate(got):
        if a["type"] == "refused":
            assert i == 0 and len(got) == 1
            problems = a.get("problems")
            assert isinstance(problems, list) and problems
            assert all(isinstance(p, str) and p and "\n" not in p for p in problems)
        elif a["type"] == "failed":
            assert i == len(got) - 1, "the server went on after saying it failed"
            assert isinstance(a.get("error"), str) and "\n" not in a["error"]
        else:
            assert i == 0 and set(a) == {"type"}


# -- running one migration against a script --------------------------------------------------------


class Run:
    """What one ``handle()`` did: its verdict, its answers, the files it created (name, and
    whether the creation succeeded) and the images it handed to the restore."""

    def __init__(self) -> None:
        self.outcome: object = None
        self.answers: list[dict[str, Any]] = []
        self.created: list[tuple[str, bool]] = []
        self.restored: list[tuple[str, dict[str, bytes], bool]] = []


@contextmanager
def server(*, preflight: bool) -> Iterator[Run]:
    """Patches at the test boundary for the examples run inside: the restore records the image
    (its name, each file's bytes, whether it verifies); ``preflight`` False accepts
    :data:`PREFLIGHT_OK` without checking this host (the image phase is what is fuzzed then);
    file creation is watched, not changed."""
    run = Run()
    real_create = _serve.create_file

    def create_file(dir_fd: int, name: str, *, source: str, mode: int = 0o600) -> int:
        try:
            fd = real_create(dir_fd, name, source=source, mode=mode)
        except BaseException:
            run.created.append((name, False))
            raise
        run.created.append((name, True))
        return fd

    def restore(self: _serve._Incoming, image: Image, name: str) -> None:
        try:
            Image.open(image.path).verify(full=True)
            verified = True
        except TorporError:
            verified = False
        files = {f.name: (image.path / f.name).read_bytes() for f in image.manifest.files}
        run.restored.append((name, files, verified))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_serve, "create_file", create_file)
        mp.setattr(_serve._Incoming, "_restore", restore)
        if not preflight:
            # The real checks need a CPU description CRIU accepts; this one takes only the
            # pre-flight every image script starts with (a garbled one is still refused).
            mp.setattr(
                _preflight,
                "problems",
                lambda msg, *, where: [] if msg == PREFLIGHT_OK else ["not the fuzzed pre-flight"],
            )
            mp.setattr(_serve._address, "problems", lambda addrs, *, where: [])
        yield run


def drive(script: bytes, *, preflight: bool) -> Run:
    """``_Incoming.handle()`` against ``script`` in a fresh jail, with every property that
    does not depend on the script checked."""
    with Jail() as jail, server(preflight=preflight) as run:
        images = jail.home / "images"
        sock = ScriptSocket(script)
        conn = Conn(sock, PEER)  # type: ignore[arg-type]
        logged: list[str] = []
        with bounded(5):
            run.outcome = verdict(lambda: _serve._Incoming(conn, WHERE, logged.append).handle())
        run.answers = answers(bytes(sock.sent))
        check_answers(run.answers)
        left = sorted(os.listdir(images)) if images.exists() else []
        assert left == [], f"left in the images directory: {left}"
        for name, made in run.created:
            assert not made or is_plain_name(name), f"a file was created from {name!r}"
        assert all("\n" not in line for line in logged)
    return run


# -- the image phase -----------------------------------------------------------------------------

# Every CRIU image has an inventory and a process tree (an image without is refused at use).
FILES = st.fixed_dictionaries(
    {"inventory.img": st.binary(max_size=64), "pstree.img": st.binary(max_size=64)},
    optional={n: st.binary(max_size=3000) for n in ["pages-1.img", "core-1.img", "mm-1.img", "x"]},
)
FACTS = {
    "cmdline": ["python3", "app.py"],
    "rss_bytes": 4096,
    "pid": 4242,
    "criu_version": "4.2.1",
    "tcp_established": False,
    "shell_job": False,
}
# Tampers after which no image can be right (the others may happen to change nothing).
ALWAYS_WRONG = {"duplicate", "longer", "frame-kind", "frame-length", "hash-missing", "cut"}
PREFLIGHT_OK = {"type": "preflight", "mode": "copy", "name": "web", "addresses": []}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_frames(data: bytes, cut: int) -> bytes:
    """A file's bytes as ``D`` frames of at most ``cut`` bytes (one empty file: no frame)."""
    return b"".join(frame(b"D", data[i : i + cut]) for i in range(0, len(data), cut))


@st.composite
def image_scripts(draw: st.DrawFn) -> tuple[bytes, dict[str, bytes], bool]:
    """A pre-flight accepted, then an image: honest, or with its message mutated (names,
    sizes, duplicates, facts) or its stream tampered with. The script, the files the peer
    meant to send, and what the server must do: ``taken`` (honest), ``refused`` (a tamper
    that always makes the image wrong) or ``either`` (a mutation that may change nothing)."""
    files = draw(FILES)
    announced: list[Any] = [{"name": n, "size": len(d)} for n, d in files.items()]
    image_msg: Any = {"type": "image", "files": announced, "facts": FACTS}
    sums: Any = {"type": "hashes", "files": {n: sha(d) for n, d in files.items()}}
    cut = draw(st.sampled_from([1, 100, 4096, MAX_DATA]))
    stream = {n: data_frames(d, cut) for n, d in files.items()}
    tamper = draw(
        st.sampled_from(
            [
                "none",
                "message",
                "message",
                "name",
                "size",
                "duplicate",
                "facts",
                "longer",
                "shorter",
                "frame-kind",
                "frame-length",
                "hash",
                "hash-missing",
                "hash-extra",
                "hashes",
                "cut",
                "garbage",
            ]
        )
    )
    victim = draw(st.sampled_from(sorted(files)))
    if tamper == "message":
        image_msg = draw(mutated_json(image_msg))
    elif tamper == "name":
        announced[0] = {**announced[0], "name": draw(HOSTILE_NAMES)}
    elif tamper == "size":
        announced[0] = {**announced[0], "size": draw(HOSTILE_INTS | JSON_VALUES)}
    elif tamper == "duplicate":
        announced.append(dict(announced[0]))
    elif tamper == "facts":
        image_msg = {**image_msg, "facts": draw(mutated_json(FACTS))}
    elif tamper == "longer":  # a D frame larger than the file announced
        stream[victim] += frame(b"D", draw(st.binary(min_size=1, max_size=64)))
    elif tamper == "shorter":
        stream[victim] = data_frames(files[victim][: len(files[victim]) // 2], cut)
    elif tamper == "frame-kind":  # a message, or an unknown frame, where file data is due
        kind = draw(st.sampled_from([b"M", b"E", b"X", b"\0"]))
        stream[victim] = frame(kind, b'{"type":"hashes","files":{}}') + stream[victim]
    elif tamper == "frame-length":  # a header announcing more than a frame may hold
        stream[victim] = _HEADER.pack(b"D", draw(st.integers(MAX_DATA + 1, 2**32 - 1)))
    elif tamper == "hash":
        sums["files"][victim] = draw(st.sampled_from([sha(b"other"), "", None, 5, "0" * 64]))
    elif tamper == "hash-missing":
        del sums["files"][victim]
    elif tamper == "hash-extra":
        sums["files"][draw(HOSTILE_NAMES)] = sha(b"")
    elif tamper == "hashes":
        sums = draw(mutated_json(sums))
    if tamper == "shorter":
        wrong = len(files[victim]) > 0
    elif tamper == "hash":
        wrong = sums["files"][victim] != sha(files[victim])
    elif tamper == "hash-extra":
        wrong = set(sums["files"]) != set(files)
    else:  # "message", "name", "size", "facts", "hashes", "garbage" may change nothing
        wrong = tamper in ALWAYS_WRONG
    expect = "taken" if tamper == "none" else "refused" if wrong else "either"
    body = message(image_msg) + b"".join(stream.values()) + message(sums)
    script = message(PREFLIGHT_OK) + body
    if tamper == "cut":
        script = script[: draw(st.integers(0, len(script) - 1))]
    elif tamper == "garbage":
        at = draw(st.integers(0, len(script)))
        script = script[:at] + draw(st.binary(min_size=1, max_size=32)) + script[at:]
    return script, files, expect


@scaled(0.5)
@given(image_scripts())
@example((message(PREFLIGHT_OK) + message({"type": "image"}), {}, "refused"))
@example((message(PREFLIGHT_OK) + message({"type": "hashes"}), {}, "refused"))
@example((message(PREFLIGHT_OK) + frame(b"D", b"x"), {}, "refused"))
def test_the_server_against_a_hostile_image(case: tuple[bytes, dict[str, bytes], str]) -> None:
    script, files, expect = case
    run = drive(script, preflight=False)
    names = [n for n, _ in run.created]
    if any(not is_plain_name(n) for n in names):
        pytest.fail(f"a bad name reached file creation: {names}")
    if expect == "refused":
        assert isinstance(run.outcome, TorporError) and run.restored == []
    if expect == "taken":
        assert run.outcome is None, f"an honest image was not taken: {run.outcome}"
        assert [a["type"] for a in run.answers] == ["ready"]
        assert run.restored == [("web", files, True)]
    for name, got, verified in run.restored:
        # Reached only with what an honest peer sends: verified, and the very bytes sent.
        assert name == "web" and verified
        assert got == files, "the restore was given files other than those the peer sent"


def test_an_honest_image_reaches_the_restore_verified() -> None:
    """The harness itself: an honest script is taken (so the properties above can fail)."""
    files = {"inventory.img": b"inv", "pstree.img": b"", "pages-1.img": os.urandom(MAX_DATA + 10)}
    announced = [{"name": n, "size": len(d)} for n, d in files.items()]
    script = (
        message(PREFLIGHT_OK)
        + message({"type": "image", "files": announced, "facts": FACTS})
        + b"".join(data_frames(d, MAX_DATA) for d in files.values())
        + message({"type": "hashes", "files": {n: sha(d) for n, d in files.items()}})
    )
    run = drive(script, preflight=False)
    assert run.outcome is None
    assert run.restored == [("web", files, True)]
    assert run.created == [(n, True) for n in files]


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"name": "../torpor-fuzz-evil", "size": 1}, "a path"),
        ({"name": "", "size": 1}, "empty"),
        ({"name": "x" * 256, "size": 1}, "too long"),
        ({"name": "x\0y", "size": 1}, "NUL"),
        ({"name": "pages-1.img", "size": -1}, "negative size"),
        ({"name": "pages-1.img", "size": True}, "a boolean size"),
        ({"name": "core-1.img", "size": 4}, "a duplicate"),
    ],
)
def test_a_bad_file_announcement_creates_nothing(bad: dict[str, Any], why: str) -> None:
    announced = [{"name": "core-1.img", "size": 4}, bad]
    script = (
        message(PREFLIGHT_OK)
        + message({"type": "image", "files": announced, "facts": FACTS})
        + frame(b"D", b"core")
        + frame(b"D", b"x")
        + message({"type": "hashes", "files": {}})
    )
    run = drive(script, preflight=False)
    assert isinstance(run.outcome, TorporError), why
    assert str(run.outcome) == f"{PEER.name} announced a bad image file {bad!r}"
    assert run.created == [] and run.restored == []
    assert [a["type"] for a in run.answers] == ["ready", "failed"]


@pytest.mark.parametrize(
    "facts",
    [{**FACTS, "pid": -1}, {**FACTS, "pid": 2**64}, {**FACTS, "pid": 0}, {**FACTS, "pid": True},
     {**FACTS, "rss_bytes": -5}, {**FACTS, "rss_bytes": 10**30}],
)  # fmt: skip
def test_facts_a_manifest_would_refuse_are_refused_before_a_byte_is_written(
    facts: dict[str, Any],
) -> None:
    # Sealed and signed, they would make an image torpor itself calls malformed.
    script = (
        message(PREFLIGHT_OK)
        + message({"type": "image", "files": [{"name": "x", "size": 1}], "facts": facts})
        + frame(b"D", b"x")
        + message({"type": "hashes", "files": {"x": sha(b"x")}})
    )
    run = drive(script, preflight=False)
    assert isinstance(run.outcome, TorporError)
    assert str(run.outcome) == f"{PEER.name} sent malformed process facts"
    assert run.created == [] and run.restored == []


def test_an_image_larger_than_the_free_space_is_refused_before_a_byte_is_written() -> None:
    huge = 1 << 60  # no disk holds it: announced, it must not be received until the disk fills
    script = (
        message(PREFLIGHT_OK)
        + message({"type": "image", "files": [{"name": "x", "size": huge}], "facts": FACTS})
        + frame(b"D", b"x")
    )
    run = drive(script, preflight=False)
    assert isinstance(run.outcome, TorporError)
    assert str(run.outcome).startswith(f"the image from {PEER.name} is {huge >> 20} MiB, more ")
    assert run.created == [] and run.restored == []
    assert [a["type"] for a in run.answers] == ["ready", "failed"]


def test_a_data_frame_larger_than_announced_is_refused() -> None:
    script = (
        message(PREFLIGHT_OK)
        + message({"type": "image", "files": [{"name": "x", "size": 2}], "facts": FACTS})
        + frame(b"D", b"abc")
        + message({"type": "hashes", "files": {"x": sha(b"ab")}})
    )
    run = drive(script, preflight=False)
    assert isinstance(run.outcome, TorporError)
    assert str(run.outcome) == f"peer {PEER.name!r} sent more file data than announced"
    assert run.restored == []
    assert run.answers[-1] == {"type": "failed", "error": str(run.outcome)}


# -- the pre-flight ------------------------------------------------------------------------------

PREFLIGHT = {
    "type": "preflight",
    "mode": "copy",
    "name": "web",
    "criu": "4.2.1",
    "kernel": "6.1.0",
    "rss_bytes": 4096,
    "cpuinfo": "anVuaw==",  # base64, but not a cpuinfo image: refused, without asking CRIU
    "files": [
        {"path": "/", "kind": "dir", "mode": 0o40755, "size": 0, "sized": False},
        {"path": "/bin/sh", "kind": "file", "mode": 0o100755, "size": 1, "sized": True},
        {"path": "/@OUT@/x", "kind": "file", "mode": 0o100644, "size": 0, "sized": False},
    ],
    "addresses": [],
}

PREFLIGHTS = st.one_of(
    # A message is a JSON object (Conn.recv refuses anything else): a mutation of the whole
    # document into another value is not one.
    mutated_json(PREFLIGHT, max_mutations=4).filter(lambda m: isinstance(m, dict)),
    st.dictionaries(st.sampled_from(sorted(PREFLIGHT)), JSON_VALUES, max_size=9),
    st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=6),
)


@given(PREFLIGHTS)
@example({})
@example({**PREFLIGHT, "rss_bytes": 2**200})
@example({**PREFLIGHT, "files": [{**PREFLIGHT["files"][1], "path": "/x/../../etc/shadow"}]})
@example({**PREFLIGHT, "files": [PREFLIGHT["files"][1]] * (_preflight.MAX_FILES + 1)})
@example({**PREFLIGHT, "cpuinfo": "x" * 100_000})
@example({**PREFLIGHT, "criu": "9" * 5000})  # past Python's int-parsing limit
@example({**PREFLIGHT, "kernel": "1" * 4301})
@example({**PREFLIGHT, "rss_bytes": 10**400})  # overflows a float
@example({**PREFLIGHT, "files": [{**PREFLIGHT["files"][1], "path": "/\ud800"}]})
def test_preflight_problems_are_lines_never_an_exception(msg: dict[str, Any]) -> None:
    with Jail() as jail:
        msg = jail.fill(msg)
        with bounded(5):
            found = _preflight.problems(msg, where=WHERE)
        assert isinstance(found, list)
        assert all(isinstance(p, str) and p and "\n" not in p for p in found)


@scaled(0.5)
@given(PREFLIGHTS | st.builds(lambda v: {"type": "preflight", **v}, PREFLIGHTS))
@example({"type": "image"})
@example({"type": "preflight", "mode": "lazy"})
def test_the_server_against_a_hostile_preflight(msg: dict[str, Any]) -> None:
    # Whatever follows the first message is a well-formed image: a pre-flight let through
    # wrongly would be seen reaching the restore.
    files = {"x": b"data"}
    image = message({"type": "image", "files": [{"name": "x", "size": 4}], "facts": FACTS}) + frame(
        b"D", b"data"
    )
    script = message(msg) + image + message({"type": "hashes", "files": {"x": sha(b"data")}})
    run = drive(script, preflight=True)
    types = [a["type"] for a in run.answers]
    if msg.get("type") != "preflight":
        assert types == [] and isinstance(run.outcome, TorporError)
    if "ready" in types:  # every check passed: then the image is what was sent
        assert run.restored in ([], [(msg["name"], files, True)])
    else:
        assert run.restored == [] and run.created == []


def test_hashes_of_files_not_sent_are_refused() -> None:
    files = {"inventory.img": b"inv", "pstree.img": b"tree"}
    announced = [{"name": n, "size": len(d)} for n, d in files.items()]
    sums = {n: sha(d) for n, d in files.items()} | {"pages-1.img": sha(b"")}
    script = (
        message(PREFLIGHT_OK)
        + message({"type": "image", "files": announced, "facts": FACTS})
        + b"".join(frame(b"D", d) for d in files.values())
        + message({"type": "hashes", "files": sums})
    )
    run = drive(script, preflight=False)
    assert isinstance(run.outcome, TorporError) and run.restored == []
    assert run.outcome.msg == (
        f"image from {PEER.name} arrived damaged: its file list did not match the source's SHA-256"
    )


# -- the pre-flight's bases ----------------------------------------------------------------------
#
# A copy-mode source names candidate bases by content id (``bases``, docs/migration.md "Chunks
# the target has"); the target looks for them in its images directory. Whatever ``bases`` is,
# the server refuses it with one line before it opens anything, or takes the migration (with
# the base it holds only if that base was named), and no path it touches is one the peer made.

BASE = {
    "inventory.img": b"inv",
    "pstree.img": b"tree",
    "pages-1.img": bytes(range(256)) * 32 + bytes(8192),  # two pages of content, two zero pages
}
IMAGE = {"inventory.img": b"inv2", "pstree.img": b"tree"}  # what the source sends, whole
CID = "@CID@"
"""Stands for the content id of the base the target holds (filled in by :func:`drive_bases`)."""
_ID = re.compile(r"[0-9a-f]{64}")
_watch: list[tuple[str, tuple[Any, ...]]] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watch is not None and (event == "open" or event.startswith(("os.", "shutil."))):
        _watch.append((event, args))


sys.addaudithook(_audit)  # permanent for the process, but it records only inside watched()


@contextmanager
def watched() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """The file system calls this process makes inside (Python's audit events)."""
    global _watch
    _watch = []
    try:
        yield _watch
    finally:
        _watch = None


def touched(events: list[tuple[str, tuple[Any, ...]]]) -> list[str]:
    """The paths named by ``events`` (an fd is not a path, nor an ``open``'s mode)."""
    out = []
    for event, args in events:
        two = event in ("os.rename", "os.link", "os.symlink")
        for a in args[: 2 if two else 1]:
            if isinstance(a, (str, bytes, os.PathLike)):
                out.append(os.fsdecode(a))
    return out


def well_formed_bases(msg: dict[str, Any]) -> bool:
    """What the protocol allows (independent of the code under test): absent, or a list of
    at most MAX_BASES content ids (64 lowercase hex digits, ASCII)."""
    if "bases" not in msg or msg["bases"] is None:
        return True
    value = msg["bases"]
    return (
        isinstance(value, list)
        and len(value) <= _dedup.MAX_BASES
        and all(isinstance(v, str) and _ID.fullmatch(v) for v in value)
    )


def _replace_cid(value: Any, cid: str) -> Any:
    if isinstance(value, str):
        return value.replace(CID, cid)
    if isinstance(value, list):
        return [_replace_cid(v, cid) for v in value]
    if isinstance(value, dict):
        return {_replace_cid(k, cid): _replace_cid(v, cid) for k, v in value.items()}
    return value


def frames_of(sent: bytes) -> list[tuple[bytes, bytes]]:
    """The server's frames, each whole."""
    out = []
    pos = 0
    while pos < len(sent):
        kind, length = _HEADER.unpack_from(sent, pos)
        body = sent[pos + _HEADER.size : pos + _HEADER.size + length]
        assert len(body) == length, "the server sent a truncated frame"
        out.append((kind, body))
        pos += _HEADER.size + length
    return out


class BasesRun(Run):
    """A :class:`Run` against a target holding :data:`BASE`: the base's content id, the file
    system calls ``handle()`` made and the ``D`` bytes it sent."""

    def __init__(self, cid: str) -> None:
        super().__init__()
        self.cid = cid
        self.events: list[tuple[str, tuple[Any, ...]]] = []
        self.data = b""
        self.size = 0  # of the pre-flight message


def drive_bases(bases: Any, *, present: bool = True) -> BasesRun:
    """``handle()`` in a fresh jail whose images directory holds :data:`BASE`, against a
    pre-flight with ``bases`` (``present`` False: no such key; :data:`CID` stands for the
    base's content id), then an honest image sent whole."""
    files = IMAGE
    announced = [{"name": n, "size": len(d)} for n, d in files.items()]
    with Jail() as jail, server(preflight=False) as plain, pytest.MonkeyPatch.context() as mp:
        base = make_base(jail.home / "images")
        cid = _dedup.content_id(base.manifest)
        msg = dict(PREFLIGHT_OK)
        if present:
            msg["bases"] = _replace_cid(bases, cid)
        # The rest of the pre-flight is the accepted one; only its bases are fuzzed here.
        mp.setattr(
            _preflight,
            "problems",
            lambda m, *, where: (
                [] if {k: v for k, v in m.items() if k != "bases"} == PREFLIGHT_OK else ["no"]
            ),
        )
        script = (
            message(msg)
            + message({"type": "image", "files": announced, "facts": FACTS})
            + b"".join(frame(b"D", d) for d in files.values())
            + message({"type": "hashes", "files": {n: sha(d) for n, d in files.items()}})
        )
        sock = ScriptSocket(script)
        conn = Conn(sock, PEER)  # type: ignore[arg-type]
        logged: list[str] = []
        run = BasesRun(cid)
        run.size = len(message(msg)) - _HEADER.size
        with bounded(5), watched() as events:
            run.outcome = verdict(lambda: _serve._Incoming(conn, WHERE, logged.append).handle())
        run.events = list(events)
        run.created, run.restored = plain.created, plain.restored
        for kind, body in frames_of(bytes(sock.sent)):
            if kind == b"M":
                run.answers.append(json.loads(body))
            else:
                assert kind == b"D" and len(run.answers) == 1, f"a {kind!r} frame out of place"
                run.data += body
        left = sorted(os.listdir(jail.home / "images"))
        assert left == [base.path.name], f"left in the images directory: {left}"
        Image.open(base.path).verify(full=True)  # the base itself untouched
        assert all("\n" not in line for line in logged)
    # Every path touched is the home's (the jail checked nothing was written elsewhere), and
    # none is one the peer named: the ids are compared, never used as names.
    named = [v for v in _strings(msg.get("bases")) if v and v != cid]
    for path in touched(run.events):
        if path.startswith(("/proc/", "/sys/")):
            pass  # this host's facts
        elif os.path.isabs(path):
            real = os.path.realpath(path)
            assert real == str(jail.home) or real.startswith(f"{jail.home}/"), path
        else:
            assert is_plain_name(path) or path == ".", path  # beside a directory's fd
        assert EVIL not in path, f"a name from the peer's bases reached {path!r}"
        for v in named:
            if "/" in v or v.startswith(".."):  # path-like: it would name a file elsewhere
                assert v not in path, f"the peer's base {v!r} reached the file system: {path!r}"
    return run


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)


def make_base(root: Path) -> Image:
    """:data:`BASE` as an image of ``root``, sealed and signed as any image here."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with staging(root / "web-base") as st_:
        for fname, data in BASE.items():
            (st_.path / fname).write_bytes(data)
        return st_.commit(
            lambda entries: _manifest.build(
                name="web-base", pid=4242, files=entries, criu_version="4.2.1",
                cmdline=("app",), rss_bytes=1,
            )
        )  # fmt: skip


def _ids(draw: st.DrawFn) -> str:
    return draw(st.text("0123456789abcdef", min_size=64, max_size=64))


@st.composite
def bad_ids(draw: st.DrawFn) -> Any:
    """What a candidate id may be instead of one: near misses of the held base's id (or of any
    id), path-like strings, other JSON values."""
    good = draw(st.sampled_from([CID, _ids(draw)]))
    return draw(
        st.sampled_from(
            [
                good,
                good.upper() if good != CID else "@cid@",
                good[:-1],
                good + "0",
                good + "\n",
                "\n" + good,
                f"../{good}",
                f"{good}/../../{EVIL}",
                f"{good}\0",
                "\u0660" * 64,  # digits, but not ASCII ones
                "\uff10" * 64,
                "../../etc/passwd",
                "/etc/shadow",
                f"images/{good}",
                "web-base",
                "*",
                "",
            ]
        )
        | HOSTILE_NAMES
        | JSON_VALUES
    )


BASES = st.one_of(
    st.lists(st.sampled_from([CID]) | st.builds(lambda: "0" * 64), max_size=_dedup.MAX_BASES),
    st.lists(st.sampled_from([CID]) | bad_ids(), max_size=5),
    st.lists(bad_ids(), min_size=1, max_size=3).map(lambda v: v * 3000),  # long lists
    JSON_VALUES,
)


@scaled(0.25)
@given(BASES)
@example([CID])
@example([CID, CID, CID])
@example(["0" * 64] * 12_000)  # near the message limit: refused without a look at the disk
@example([0] * 200_000)
@example({CID: CID})
@example(CID)
@example([[CID]])
@example([f"{CID}/../../{EVIL}"])
@example([CID.upper()])
def test_the_server_against_hostile_bases(bases: Any) -> None:
    run = drive_bases(bases)
    msg = {"bases": _replace_cid(bases, run.cid)}
    types = [a.get("type") for a in run.answers]
    if run.size > MAX_MESSAGE:  # the channel refuses the message itself, unread
        assert isinstance(run.outcome, ChannelError) and types == [] and run.created == []
        return
    if not well_formed_bases(msg):
        assert types == ["refused"], f"bases {bases!r:.200} were not refused: {types}"
        problems = run.answers[0]["problems"]
        assert len(problems) == 1 and "\n" not in problems[0] and len(problems[0]) <= 200
        assert run.outcome is None and run.created == [] and run.restored == []
        # Refused before the images directory was looked at.
        assert not [p for p in touched(run.events) if "images" in p], touched(run.events)
        return
    assert run.outcome is None, f"well-formed bases {bases!r:.200} failed: {run.outcome}"
    assert types[0] == "ready" and run.restored == [("web", IMAGE, True)]
    offered = run.answers[0].get("base")
    if run.cid in (msg["bases"] or []):
        chunks = len(BASE) - 1 + len(BASE["pages-1.img"]) // 4096
        assert offered == run.cid and run.answers[0]["chunks"] == chunks
        assert len(run.data) == chunks * 32  # its chunk ids
    else:
        assert offered is None and run.data == b""


def test_bases_absent_or_null_mean_none() -> None:
    for run in (drive_bases(None, present=False), drive_bases(None)):
        assert run.outcome is None and [a["type"] for a in run.answers] == ["ready"]
        assert "base" not in run.answers[0]
