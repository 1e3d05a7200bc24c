"""Copy mode against a base (``torpor._migrate._dedup``, ``_dedup_target``): the chunk ids, the
plans and the files rebuilt from them, over a real :class:`Conn` on a socket pair; every list,
plan and id a peer may send, checked at its boundary (Hypothesis for the hostile ones); the
target's cache of a base's ids and its verification of the base.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torpor._identity._trust import Peer
from torpor._images import _manifest
from torpor._images._image import Image, staging
from torpor._images._layout import VERIFIED_NAME
from torpor._migrate import _dedup, _dedup_source, _dedup_target
from torpor._migrate._channel import Conn
from torpor._migrate._dedup import (
    OP_BASE,
    OP_LITERAL,
    OP_ZERO,
    SEGMENT_BYTES,
    BaseFile,
    DedupError,
    content_id,
    decode_plan,
    encode_plan,
    layout,
    parse_ids,
    segment_lengths,
)
from torpor._migrate._dedup_source import SourceBase, plan, read_lists
from torpor._pools._cas import PAGE_SIZE, ZERO_PAGE, digest

PEER = Peer(name="peer", fingerprint="sha256:" + "0" * 64, cert_der=None, added=0, via="test")
RUN = struct.Struct("<BHII")


def page(n: int) -> bytes:
    """A page of its own content (never the zero page)."""
    return hashlib.sha256(n.to_bytes(8, "little")).digest() * (PAGE_SIZE // 32)


@pytest.fixture
def pair() -> Iterator[tuple[Conn, Conn]]:
    """Two :class:`Conn` on the ends of a socket pair (the channel's framing, without TLS)."""
    a, b = socket.socketpair()
    left, right = Conn(a, PEER), Conn(b, PEER)  # type: ignore[arg-type]
    try:
        yield left, right
    finally:
        a.close()
        b.close()


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` in a thread; the returned function joins it and gives its result (or
    raises its error)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join() -> Any:
        t.join(30)
        assert not t.is_alive()
        if "error" in out:
            raise out["error"]
        return out["value"]

    return join


def source_base(files: dict[str, bytes]) -> SourceBase:
    """The base of ``files`` as a source holds it once the target sent its ids."""
    entries = [
        _manifest.FileEntry(n, len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()
    ]
    lay = layout(entries)
    lists = [
        [digest(files[f.name][p : p + f.chunk]) for p in range(0, f.size, f.chunk)] for f in lay
    ]
    return SourceBase("0" * 64, lay, lists)


def write(path: Path, data: bytes) -> int:
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def transfer(
    pair: tuple[Conn, Conn],
    tmp: Path,
    name: str,
    data: bytes,
    base_files: dict[str, bytes],
    target_files: dict[str, bytes] | None = None,
) -> tuple[str, str, _dedup.Counts, _dedup.Counts, bytes]:
    """Send ``data`` as file ``name`` against the base ``base_files`` (the target's copy of it
    ``target_files``, by default the same); the source's and the target's SHA-256, both sides'
    counts and the bytes the target wrote."""
    src, dst = pair
    base = source_base(base_files)
    theirs = target_files if target_files is not None else base_files
    held_fds = []
    for f in base.files:
        held_fds.append(write(tmp / f"base-{f.name}", theirs[f.name]))
    held = _dedup_target.Held(
        _dedup_target.BaseCache(),
        base.id,
        None,
        base.files,
        held_fds,
        b"",  # type: ignore[arg-type]
    )
    dump = write(tmp / "dump", data)
    out = os.open(tmp / "out", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        join = in_thread(lambda: _dedup_target.receive_file(dst, out, name, len(data), held))
        sent_hash, sent = _dedup_source.send_file(src, dump, name, len(data), base)
        got_hash, got = join()
    finally:
        for fd in [dump, out, *held_fds]:
            os.close(fd)
    return sent_hash, got_hash, sent, got, (tmp / "out").read_bytes()


# -- round trips -------------------------------------------------------------------------------


def test_pages_moved_changed_and_zero_cross_as_plans(
    pair: tuple[Conn, Conn], tmp_path: Path
) -> None:
    base = b"".join(page(i) for i in range(3000))
    # The same memory, 7 pages inserted in front (it moved), 5 pages changed, zero pages, a
    # page that is only in the base's other file, and a short tail.
    new = bytearray(b"".join(page(10_000 + i) for i in range(7)) + base)
    for i in (100, 101, 102, 2000, 2999):
        new[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = page(20_000 + i)
    new += bytes(PAGE_SIZE) * 4 + page(77_777) + b"tail"
    others = {"pages-2.img": page(77_777), "core-1.img": b"x" * 100}
    sent_hash, got_hash, sent, got, out = transfer(
        pair, tmp_path, "pages-1.img", bytes(new), {"pages-1.img": base, **others}
    )
    assert out == new
    assert sent_hash == got_hash == hashlib.sha256(new).hexdigest()
    assert (sent.sent, sent.from_base, sent.zero) == (got.sent, got.from_base, got.zero)
    assert sent.zero == 4 * PAGE_SIZE
    assert sent.sent == (7 + 5) * PAGE_SIZE + 4  # the new pages and the tail
    assert sent.from_base == len(new) - sent.sent - sent.zero


def test_a_file_over_several_segments_and_one_mib_chunks(
    pair: tuple[Conn, Conn], tmp_path: Path
) -> None:
    base = os.urandom(SEGMENT_BYTES + 3 * PAGE_SIZE + 17)
    new = base[:PAGE_SIZE] + b"!" + base[PAGE_SIZE + 1 :]
    _, got_hash, sent, _, out = transfer(pair, tmp_path, "pages-1.img", new, {"pages-1.img": base})
    assert out == new and got_hash == hashlib.sha256(new).hexdigest()
    assert sent.sent == PAGE_SIZE
    big = os.urandom(3 << 20) + b"end"
    changed = big[: 2 << 20] + b"?" + big[(2 << 20) + 1 :]
    _, got_hash, sent, _, out = transfer(pair, tmp_path, "mm-1.img", changed, {"mm-1.img": big})
    assert out == changed and got_hash == hashlib.sha256(changed).hexdigest()
    assert sent.sent == 1 << 20  # the changed 1 MiB chunk only
    small = b"fdinfo" * 10  # one chunk, shorter than its chunk size
    _, got_hash, sent, _, out = transfer(
        pair, tmp_path, "fdinfo-2.img", small, {"fdinfo-2.img": small}
    )
    assert out == small and (sent.sent, sent.from_base) == (0, len(small))


def test_a_damaged_base_there_gives_a_file_whose_hash_differs(
    pair: tuple[Conn, Conn], tmp_path: Path
) -> None:
    """The source trusts the target's ids; the bytes there are not what the ids say: the
    target writes them, and its hash of the file is not the source's (the migration fails)."""
    base = b"".join(page(i) for i in range(64))
    rotten = bytearray(base)
    rotten[10 * PAGE_SIZE + 5] ^= 1
    sent_hash, got_hash, sent, _, out = transfer(
        pair, tmp_path, "pages-1.img", base, {"pages-1.img": base}, {"pages-1.img": bytes(rotten)}
    )
    assert sent.from_base == len(base) and out == rotten
    assert sent_hash == hashlib.sha256(base).hexdigest() != got_hash


def test_plan_runs_follow_the_base() -> None:
    base = source_base({"pages-1.img": b"".join(page(i) for i in range(10))})
    new = b"".join(page(i) for i in (0, 1, 2, 99)) + bytes(PAGE_SIZE) + page(5) + page(6)
    runs, counts = plan(new, "pages-1.img", 0, base)
    assert runs == [
        [OP_BASE, 0, 0, 3],
        [OP_LITERAL, 0, 0, 1],
        [OP_ZERO, 0, 0, 1],
        [OP_BASE, 0, 5, 2],
    ]
    assert (counts.sent, counts.zero, counts.from_base) == (PAGE_SIZE, PAGE_SIZE, 5 * PAGE_SIZE)


def test_this_hosts_copy_of_the_base_is_compared_before_anything_is_hashed(
    home: Path,
) -> None:
    """With this host's copy open, a chunk equal to it at the same place (or where a run goes
    on) is a base chunk without its hash: a chunk that only this copy holds shows it."""
    pages = b"".join(page(i) for i in range(40))
    files = {"inventory.img": b"inv", "pstree.img": b"tree", "pages-1.img": pages}
    mine = make_image(home / "images", "base", files)
    exact = source_base(files)
    exact.lists[exact.by_name["pages-1.img"]][3] = b"\0" * 32  # not what is here
    theirs = SourceBase(content_id(mine.manifest), exact.files, exact.lists)
    new = bytearray(pages)
    # Moved by two pages from page 10 on (a hashed hit starts the run, compared after).
    new[10 * PAGE_SIZE :] = bytes(2 * PAGE_SIZE) + pages[10 * PAGE_SIZE : -2 * PAGE_SIZE]
    view = bytes(new)
    hashed, _ = plan(view, "pages-1.img", 0, theirs)
    assert hashed[:2] == [[OP_BASE, 1, 0, 3], [OP_LITERAL, 0, 0, 1]]
    theirs.open_local(str(mine.path))
    try:
        assert len(theirs.local) == 3
        runs, counts = plan(view, "pages-1.img", 0, theirs)
    finally:
        theirs.close()
    assert runs == [[OP_BASE, 1, 0, 10], [OP_ZERO, 0, 0, 2], [OP_BASE, 1, 10, 28]]
    assert counts.sent == 0 and counts.zero == 2 * PAGE_SIZE
    other = source_base({**files, "pstree.img": b"other"})
    other.id = "1" * 64
    other.open_local(str(mine.path))  # not the image of that id: not used
    assert other.local == []


# -- what a peer sends, checked -------------------------------------------------------------------

FILES = (
    BaseFile("pages-1.img", 10 * PAGE_SIZE, PAGE_SIZE, 10),
    BaseFile("core-1.img", 10, 1 << 20, 1),
)
LENGTHS = [PAGE_SIZE] * 8


@pytest.mark.parametrize(
    ("runs", "error"),
    [
        ([(OP_BASE, 0, 5, 8)], "outside its 10 chunks"),  # past the base file's end
        ([(OP_BASE, 0, 0xFFFFFFFF, 8)], "outside its 10 chunks"),
        ([(OP_BASE, 2, 0, 8)], "base file 2 of 2"),
        ([(OP_BASE, 1, 0, 8)], "outside"),  # a file cut in 1 MiB chunks
        ([(OP_LITERAL, 0, 0, 7)], "do not cover"),
        ([(OP_LITERAL, 0, 0, 9)], "do not cover"),
        ([(OP_LITERAL, 0, 0, 1)] * 9, "does not fit"),
        ([(OP_LITERAL, 0, 0, 4), (OP_ZERO, 0, 0, 5)], "do not cover"),
        ([(OP_LITERAL, 0, 0, 0), (OP_LITERAL, 0, 0, 8)], "do not cover"),
        ([(OP_LITERAL, 0, 3, 8)], "names a base chunk"),
        ([(9, 0, 0, 8)], "unknown op 9"),
    ],
)
def test_hostile_plans_refused(runs: list[tuple[int, int, int, int]], error: str) -> None:
    with pytest.raises(DedupError, match=error):
        decode_plan(encode_plan(runs), LENGTHS, PAGE_SIZE, FILES)


def test_plan_checks_lengths_zero_pages_and_a_missing_base() -> None:
    with pytest.raises(DedupError, match="no base was agreed"):
        decode_plan(encode_plan([(OP_BASE, 0, 0, 8)]), LENGTHS, PAGE_SIZE, None)
    short = [PAGE_SIZE, 100]
    with pytest.raises(DedupError, match="not a whole page"):
        decode_plan(encode_plan([(OP_ZERO, 0, 0, 2)]), short, PAGE_SIZE, FILES)
    with pytest.raises(DedupError, match="other lengths"):  # a short chunk from a full one
        decode_plan(encode_plan([(OP_BASE, 0, 0, 2)]), short, PAGE_SIZE, FILES)
    with pytest.raises(DedupError, match="does not fit"):
        decode_plan(b"\x01" * 5, LENGTHS, PAGE_SIZE, FILES)
    with pytest.raises(DedupError, match="does not fit"):
        decode_plan(b"", LENGTHS, PAGE_SIZE, FILES)
    ok = decode_plan(encode_plan([(OP_BASE, 0, 2, 8)]), LENGTHS, PAGE_SIZE, FILES)
    assert ok == [(OP_BASE, 0, 2 * PAGE_SIZE, 8, 8 * PAGE_SIZE)]


@settings(max_examples=300)
@given(
    blob=st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.tuples(
                st.integers(0, 4),
                st.integers(0, 3),
                st.integers(0, 1 << 32 - 1),
                st.integers(0, 12),
            ),
            max_size=10,
        ).map(encode_plan),
    ),
    n=st.integers(1, 9),
    tail=st.integers(1, PAGE_SIZE),
)
def test_any_plan_is_refused_or_stays_inside_its_segment_and_base(
    blob: bytes, n: int, tail: int
) -> None:
    lengths = [PAGE_SIZE] * (n - 1) + [tail]
    try:
        runs = decode_plan(blob, lengths, PAGE_SIZE, FILES)
    except DedupError as exc:
        assert "\n" not in exc.msg
        return
    assert sum(r[3] for r in runs) == n
    assert sum(r[4] for r in runs) == sum(lengths)
    for op, f, offset, count, nbytes in runs:
        assert op in (OP_LITERAL, OP_ZERO, OP_BASE) and count > 0
        if op == OP_BASE:
            assert offset + nbytes <= FILES[f].size and FILES[f].chunk == PAGE_SIZE
        if op == OP_ZERO:
            assert nbytes == count * PAGE_SIZE


@given(
    st.one_of(
        st.none(), st.integers(), st.text(max_size=70), st.lists(st.text(max_size=70), max_size=4)
    )
)
def test_any_bases_field_is_refused_or_content_ids(value: object) -> None:
    try:
        ids = parse_ids(value)
    except DedupError as exc:
        assert "\n" not in exc.msg and len(exc.msg) <= 200
        return
    assert len(ids) <= _dedup.MAX_BASES
    assert all(len(i) == 64 and set(i) <= set("0123456789abcdef") for i in ids)


def test_bases_field() -> None:
    good = "ab" * 32
    assert parse_ids(None) == [] and parse_ids([good, good]) == [good]
    for bad in ("x", [good] * 3, [good.upper()], [good + "0"], ["../../etc"], [1]):
        with pytest.raises(DedupError):
            parse_ids(bad)


def _lists_reply(pair: tuple[Conn, Conn], reply: dict[str, Any], frames: list[bytes]) -> Any:
    src, dst = pair
    offered = {"c" * 64: FILES}
    for f in frames:
        _dedup_source.send_bytes(dst, f)
    return read_lists(src, reply, offered)


def test_chunk_lists_from_the_target_are_checked(pair: tuple[Conn, Conn]) -> None:
    ids = [page(i)[:32] for i in range(11)]
    good = {"type": "ready", "base": "c" * 64, "chunks": 11}
    base = _lists_reply(pair, good, [b"".join(ids[:5]), b"".join(ids[5:])])
    assert base.lists == [ids[:10], ids[10:]]  # in the order of the base's files
    assert base.index[ids[10]] == (1, 0) and base.index[ids[3]] == (0, 3)
    assert _lists_reply(pair, {"type": "ready"}, []) is None
    with pytest.raises(DedupError, match="not offered"):
        _lists_reply(pair, {**good, "base": "d" * 64}, [])
    with pytest.raises(DedupError, match="whose manifest gives 11"):
        _lists_reply(pair, {**good, "chunks": 1 << 40}, [])
    with pytest.raises(DedupError, match="longer than announced"):
        _lists_reply(pair, good, [b"".join(ids) + b"x" * 32])


# -- the target's bases ------------------------------------------------------------------------


def make_image(root: Path, name: str, files: dict[str, bytes]) -> Image:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with staging(root / name) as st_:
        for fname, data in files.items():
            (st_.path / fname).write_bytes(data)
        return st_.commit(
            lambda entries: _manifest.build(
                name=name, pid=4242, files=entries, criu_version="4.2.1",
                cmdline=("app",), rss_bytes=1,
            )
        )  # fmt: skip


BASE_FILES = {
    "inventory.img": b"inv",
    "pstree.img": b"tree",
    "pages-1.img": b"".join(page(i) for i in range(20)) + bytes(PAGE_SIZE),
}


def test_content_id_is_the_files_not_the_manifest(tmp_path: Path) -> None:
    a = make_image(tmp_path / "a", "one", BASE_FILES)
    b = make_image(tmp_path / "b", "other-name", BASE_FILES)
    c = make_image(tmp_path / "c", "one", {**BASE_FILES, "pstree.img": b"TREE"})
    assert a.manifest.id != b.manifest.id
    assert content_id(a.manifest) == content_id(b.manifest) != content_id(c.manifest)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    h.mkdir(mode=0o700)
    monkeypatch.setenv("TORPOR_HOME", str(h))
    return h


def test_cache_holds_a_base_reuses_its_ids_and_refuses_a_damaged_one(home: Path) -> None:
    image = make_image(home / "images", "base", BASE_FILES)
    make_image(home / "images", "unrelated", {**BASE_FILES, "pstree.img": b"x"})
    cid = content_id(image.manifest)
    cache = _dedup_target.BaseCache()
    logged: list[str] = []
    assert cache.hold(["f" * 64], logged.append) is None
    held = cache.hold([cid], logged.append)
    assert held is not None and held.image.path == image.path
    lay = layout(image.manifest.files)
    want = b"".join(
        digest(BASE_FILES[f.name][p : p + f.chunk]) for f in lay for p in range(0, f.size, f.chunk)
    )
    assert held.ids == want and ZERO_PAGE in want
    held.close()
    assert logged[-1].endswith("chunk ids computed in " + logged[-1].rsplit(" in ", 1)[1])
    again = cache.hold([cid], logged.append)
    assert again is not None and " cached in " in logged[-1]
    again.close()
    # Damaged (its stamp no longer vouches for it): verified in full, refused, not held.
    pages = image.path / "pages-1.img"
    os.chmod(pages, 0o600)
    data = bytearray(pages.read_bytes())
    data[5] ^= 1
    pages.write_bytes(bytes(data))
    assert cache.hold([cid], logged.append) is None
    assert logged[-1].startswith(f"base image {image.path} not used: ")
    assert "pages-1.img does not match its SHA-256" in logged[-1]


def test_distrust_forgets_the_ids_and_the_stamp(home: Path) -> None:
    image = make_image(home / "images", "base", BASE_FILES)
    cid = content_id(image.manifest)
    cache = _dedup_target.BaseCache()
    held = cache.hold([cid], lambda _: None)
    assert held is not None and (image.path / VERIFIED_NAME).exists()
    held.distrust()
    held.close()
    assert not (image.path / VERIFIED_NAME).exists()
    logged: list[str] = []
    again = cache.hold([cid], logged.append)
    assert again is not None and " computed in " in logged[-1]
    again.close()


def test_segment_lengths() -> None:
    assert segment_lengths("pages-1.img", PAGE_SIZE * 2 + 1, 0) == [PAGE_SIZE, PAGE_SIZE, 1]
    assert segment_lengths("core-1.img", 10, 0) == [10]
    n = SEGMENT_BYTES // PAGE_SIZE
    assert len(segment_lengths("pages-1.img", SEGMENT_BYTES + 5, 0)) == n
    assert segment_lengths("pages-1.img", SEGMENT_BYTES + 5, SEGMENT_BYTES) == [5]


# -- a hostile source's plans, end to end --------------------------------------------------------


class Script:
    """Stands for the socket under a :class:`Conn`: ``recv`` reads the peer's bytes, then end
    of stream; what is sent back is dropped."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def recv(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def sendall(self, data: bytes) -> None:
        pass

    def settimeout(self, seconds: float | None) -> None:
        pass

    def close(self) -> None:
        pass


def d_frame(body: bytes) -> bytes:
    return struct.pack(">cI", b"D", len(body)) + body


@st.composite
def covering_runs(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, int, int]]]:
    """A file size and runs that mostly cover its chunks exactly (so that the checks of
    each run's base file, place and length are what is tested), now and then not."""
    size = draw(st.integers(1, 10 * PAGE_SIZE))
    left = -(-size // PAGE_SIZE)
    runs = []
    while left > 0:
        count = draw(st.integers(1, left))
        op = draw(st.sampled_from([OP_LITERAL, OP_ZERO, OP_BASE, OP_BASE, 0, 7]))
        f = draw(st.integers(0, 2)) if op == OP_BASE else draw(st.sampled_from([0, 0, 0, 1]))
        start = draw(st.integers(0, 40)) if op == OP_BASE else draw(st.sampled_from([0, 0, 0, 5]))
        runs.append((op, f, start, draw(st.sampled_from([count, count, count, count + 1]))))
        left -= count
    return size, runs


@settings(max_examples=500, deadline=None)
@given(
    planned=covering_runs(),
    literal=st.binary(max_size=3 * PAGE_SIZE),
    cut=st.integers(0, 64),
)
def test_a_hostile_source_cannot_write_outside_the_file_or_read_outside_the_base(
    tmp_path_factory: pytest.TempPathFactory,
    planned: tuple[int, list[tuple[int, int, int, int]]],
    literal: bytes,
    cut: int,
) -> None:
    """Whatever plans and bytes a source sends, the target refuses them with one line
    (:class:`DedupError` or the channel's error) or writes a file of exactly its size, made
    of literal bytes sent, zeros and bytes of the base's files only."""
    from torpor._migrate._channel import ChannelError

    size, runs = planned
    tmp = tmp_path_factory.mktemp("hostile")
    base_data = {"pages-1.img": bytes(range(256)) * 64 * 8, "core-1.img": b"core" * 100}
    lay = layout(
        [
            _manifest.FileEntry(n, len(d), hashlib.sha256(d).hexdigest())
            for n, d in base_data.items()
        ]
    )
    fds = [write(tmp / f.name, base_data[f.name]) for f in lay]
    held = _dedup_target.Held(
        _dedup_target.BaseCache(),
        "0" * 64,
        None,
        lay,
        fds,
        b"",  # type: ignore[arg-type]
    )
    script = d_frame(encode_plan(runs)) + b"".join(
        d_frame(literal[p : p + 4096]) for p in range(0, len(literal), 4096)
    )
    script = script[: len(script) - cut] if cut < len(script) else script
    conn = Conn(Script(script), PEER)  # type: ignore[arg-type]
    out_path = tmp / "out"
    out = os.open(out_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            got_hash, counts = _dedup_target.receive_file(conn, out, "pages-1.img", size, held)
        except ChannelError as exc:  # DedupError is one
            assert "\n" not in exc.msg
            return
    finally:
        for fd in [out, *fds]:
            os.close(fd)
    data = out_path.read_bytes()
    assert len(data) == size and got_hash == hashlib.sha256(data).hexdigest()
    assert counts.sent + counts.zero + counts.from_base == size
    allowed = literal + b"".join(base_data.values())
    for p in range(0, size, PAGE_SIZE):
        page_ = data[p : p + PAGE_SIZE]
        assert page_ == bytes(len(page_)) or page_ in allowed


def test_an_image_against_a_base_not_agreed_is_refused(home: Path) -> None:
    image = make_image(home / "images", "base", BASE_FILES)
    held = _dedup_target.BaseCache().hold([content_id(image.manifest)], lambda _: None)
    assert held is not None
    try:
        assert _dedup_target.agreed(None, held, "a") is None
        assert _dedup_target.agreed(held.id, held, "a") is held
        for named in ("f" * 64, 3, ["x"]):
            with pytest.raises(DedupError, match="a base that was not agreed"):
                _dedup_target.agreed(named, held, "a")
        with pytest.raises(DedupError, match="not agreed"):
            _dedup_target.agreed(held.id, None, "a")
    finally:
        held.close()
