"""Many copies (``_process._copies``): bounds, parallelism, path locks, the derived image."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import threading
import time
from pathlib import Path

import pytest

from torpor._cli import main
from torpor._errors import ImageCorruptedError, RestoreError, UsageError
from torpor._images._criu_images import criu_images_pb2 as pb
from torpor._images._image import Image
from torpor._process import _copies

from .test_pool_support import make_image

MiB = 1 << 20


# -- CRIU image bytes, written independently of the module's codec -----------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        if n < 0x80:
            return bytes(out + bytes([n]))
        out.append(n & 0x7F | 0x80)
        n >>= 7


def _num(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _len(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _img(magic: int, entries: list[bytes]) -> bytes:
    return struct.pack("<II", 0x54564319, magic) + b"".join(
        struct.pack("<I", len(e)) + e for e in entries
    )


FILES, REMAPS = 0x56303138, 0x59133954
# sk_opts_entry: sndbuf, rcvbuf, the four timeouts, reuseaddr=1; so_reuseport (17) appended.
OPTS = _num(1, 4096) + _num(2, 8192) + b"".join(_num(f, 0) for f in (3, 4, 5, 6)) + _num(7, 1)
OPTS_WITH_REUSEPORT = OPTS + _num(17, 1)


def _inet(file_id: int, state: int, opts: bytes) -> bytes:
    isk = pb.InetSkEntry(id=file_id, ino=100 + file_id, family=2, type=1, proto=6, state=state)
    isk_bytes = isk.SerializeToString() + _len(14, opts) + _num(15, 0)  # opts, then v6only
    return _num(1, 4) + _num(2, file_id) + _len(4, isk_bytes)


def _reg(file_id: int, name: str) -> bytes:
    return pb.FileEntry(
        type=1, id=file_id, reg=pb.RegFileEntry(id=file_id, name=name)
    ).SerializeToString()


def _unix(file_id: int, name: bytes) -> bytes:
    usk = pb.UnixSkEntry(id=file_id, ino=200 + file_id, type=1, state=10, name=name)
    return _num(1, 5) + _num(2, file_id) + _len(16, usk.SerializeToString())


def _remap(orig: int, remap_id: int, kind: int | None) -> bytes:
    return _num(1, orig) + _num(2, remap_id) + (b"" if kind is None else _num(3, kind))


LISTEN, ESTABLISHED = 10, 1


def test_listening_sockets_get_so_reuseport_and_nothing_else_changes() -> None:
    listen_off = _inet(1, LISTEN, OPTS + _num(17, 0))
    listen_absent = _inet(2, LISTEN, OPTS)
    listen_on = _inet(3, LISTEN, OPTS_WITH_REUSEPORT)
    connected = _inet(4, ESTABLISHED, OPTS + _num(17, 0))
    reg = _reg(5, "/tmp/x")
    data = _img(FILES, [reg, listen_off, connected, listen_absent, listen_on])

    out, changed = _copies.with_reuseport(data)

    assert changed == 2
    expected = _img(
        FILES,
        [
            reg,
            _inet(1, LISTEN, OPTS_WITH_REUSEPORT),  # set where it was
            connected,
            _inet(2, LISTEN, OPTS_WITH_REUSEPORT),  # appended
            listen_on,
        ],
    )
    assert out == expected
    assert _copies.with_reuseport(out) == (out, 0)


def test_a_damaged_files_img_is_refused_naming_it() -> None:
    data = _img(FILES, [_inet(1, LISTEN, OPTS)])
    with pytest.raises(ImageCorruptedError) as info:
        _copies.with_reuseport(data[:-3])
    assert str(info.value) == (
        "files.img is truncated: entry at offset 8 — the image is damaged; checkpoint again"
    )
    with pytest.raises(ImageCorruptedError):
        _copies.with_reuseport(struct.pack("<II", 0x54564319, REMAPS))


def _image_dir(tmp_path: Path, files: list[bytes], remaps: list[bytes] | None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "files.img").write_bytes(_img(FILES, files))
    if remaps is not None:
        (tmp_path / "remap-fpath.img").write_bytes(_img(REMAPS, remaps))
    return tmp_path


def test_facts_name_the_paths_a_restore_creates(tmp_path: Path) -> None:
    files = [
        _reg(1, "/tmp/wgunicorn-a"),
        _reg(2, "/tmp/wgunicorn-b"),
        _reg(3, "/var/linked"),
        _unix(4, b"/run/app.ctl\0"),
        _unix(5, b"\0abstract"),
        _inet(6, LISTEN, OPTS),
        _inet(7, LISTEN, OPTS_WITH_REUSEPORT),
        _inet(8, ESTABLISHED, OPTS),
    ]
    remaps = [
        _remap(1, 0x1A, 1),  # a ghost
        _remap(3, 9, 0),  # linked: no path created
        _remap(2, (1 << 31) | 2, None),  # a ghost, as older images flag it
    ]
    facts = _copies.read_facts(_image_dir(tmp_path, files, remaps))
    assert facts == _copies.ImageFacts(
        listeners=2,
        solo_listeners=1,
        paths=(
            "ghost:/tmp/wgunicorn-a.cr.1a.ghost",
            "ghost:/tmp/wgunicorn-b.cr.2.ghost",
            "unix::/run/app.ctl",
        ),
    )
    assert _copies.read_facts(_image_dir(tmp_path / "plain", [_reg(1, "/x")], None)) == (
        _copies.ImageFacts(0, 0, ())
    )


# -- bounds -------------------------------------------------------------------------------------


def _meminfo(tmp_path: Path, available: int, total: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(
        f"MemTotal:       {total // 1024} kB\nMemFree:        1 kB\n"
        f"MemAvailable:   {available // 1024} kB\n"
    )
    return path


def test_count_bounds() -> None:
    _copies.check_count(_copies.MAX_COUNT)
    with pytest.raises(UsageError) as info:
        _copies.check_count(_copies.MAX_COUNT + 1)
    assert str(info.value) == (
        "--count 101 is more than the 100 copies one restore makes — restore at most 100 "
        "copies per command (run it again for more)"
    )
    with pytest.raises(UsageError) as info:
        _copies.check_count(0)
    assert str(info.value) == "--count must be at least 1, not 0"


def test_cli_refuses_too_many_copies_before_anything(
    torpor_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["restore", "no-such-image", "--count", "1000"]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == (
        "",
        "torpor: error: --count 1000 is more than the 100 copies one restore makes — restore "
        "at most 100 copies per command (run it again for more)\n",
    )


def test_copies_that_do_not_fit_in_memory_are_refused(torpor_home: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "images", "web", bytes(100 * MiB // 64) * 64)
    assert _copies.copy_bytes(image.manifest) == 100 * MiB
    # 1 GiB available of 4 GiB: the margin is 256 MiB (more than 4 GiB / 20), 768 MiB is free.
    meminfo = _meminfo(tmp_path, 1024 * MiB, 4096 * MiB)
    _copies.check_fits(image, 7, meminfo=meminfo)
    with pytest.raises(UsageError) as info:
        _copies.check_fits(image, 8, meminfo=meminfo)
    assert str(info.value) == (
        "8 copies of image 'web' need 800.0 MiB of memory (8 x 100.0 MiB) but only 768.0 MiB "
        "is free for them (1.0 GiB available less a 256.0 MiB margin) — restore at most 7 "
        "copies, or free memory"
    )
    # On 40 GiB the margin is a twentieth: 2 GiB.
    with pytest.raises(UsageError) as info:
        _copies.check_fits(image, 2, meminfo=_meminfo(tmp_path, 2148 * MiB, 40960 * MiB))
    assert str(info.value) == (
        "2 copies of image 'web' need 200.0 MiB of memory (2 x 100.0 MiB) but only 100.0 MiB "
        "is free for them (2.1 GiB available less a 2.0 GiB margin) — restore at most 1 copy, "
        "or free memory"
    )
    # One copy only has to fit.
    _copies.check_fits(image, 1, meminfo=_meminfo(tmp_path, 101 * MiB, 4096 * MiB))
    with pytest.raises(UsageError) as info:
        _copies.check_fits(image, 1, meminfo=_meminfo(tmp_path, 99 * MiB, 4096 * MiB))
    assert str(info.value) == (
        "image 'web' needs 100.0 MiB of memory but only 99.0 MiB is available — free memory first"
    )
    with pytest.raises(UsageError) as info:
        _copies.check_fits(image, 3, meminfo=_meminfo(tmp_path, 200 * MiB, 4096 * MiB))
    assert str(info.value).endswith(
        "(200.0 MiB available less a 256.0 MiB margin) — free memory first"
    )


def test_copy_memory_falls_back_to_rss_without_page_files(
    torpor_home: Path, tmp_path: Path
) -> None:
    image = make_image(tmp_path, "x", b"p" * 4096)
    manifest = image.manifest.evolve(
        files=tuple(f for f in image.manifest.files if not f.name.startswith("pages-")),
        rss_bytes=12345,
    )
    assert _copies.copy_bytes(manifest) == 12345


# -- parallelism ----------------------------------------------------------------------------------


def test_run_bounded_never_runs_more_than_the_workers_at_once() -> None:
    active = 0
    peak = 0
    lock = threading.Lock()

    def fn(i: int) -> int:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        with lock:
            active -= 1
        return i * i

    assert _copies.run_bounded(10, fn, workers=3) == [i * i for i in range(10)]
    assert peak == 3
    assert _copies.parallelism() == max(2, len(os.sched_getaffinity(0)))


def test_run_bounded_starts_nothing_after_a_failure() -> None:
    started: list[int] = []
    boom = RuntimeError("copy 1 failed")

    def fn(i: int) -> int:
        started.append(i)
        if i == 1:
            raise boom
        return i

    assert _copies.run_bounded(6, fn, workers=1) == [0, boom, None, None, None, None]
    assert started == [0, 1]


# -- path locks -------------------------------------------------------------------------------


def _bucket(path: str) -> int:
    return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) % 64


def test_restores_creating_one_path_take_turns_and_others_do_not_wait(torpor_home: Path) -> None:
    ghost = "ghost:/tmp/wgunicorn-a.cr.1.ghost"
    other = next(
        p for p in (f"ghost:/tmp/o{i}" for i in range(100)) if _bucket(p) != _bucket(ghost)
    )
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with _copies.path_locks([ghost]):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(10)
    try:
        started = time.monotonic()
        with _copies.path_locks([other]):
            assert time.monotonic() - started < 0.5  # another path: no waiting
        got = threading.Event()

        def waiter() -> None:
            with _copies.path_locks([other, ghost]):
                got.set()

        w = threading.Thread(target=waiter)
        w.start()
        assert not got.wait(0.3)  # the same path: waits for the holder
        release.set()
        assert got.wait(10)
        w.join()
    finally:
        release.set()
        t.join()
    locks = torpor_home / "locks"
    assert stat.S_IMODE(locks.stat().st_mode) == 0o700
    assert sorted(p.name for p in locks.iterdir()) == sorted(
        {f"restore-path-{_bucket(p):02d}.lock" for p in (ghost, other)}
    )


# -- the derived image -------------------------------------------------------------------------


def _server_image(root: Path, files_img: bytes) -> Image:
    return make_image(root, "srv", b"\1" * 8192, extra={"files.img": files_img})


def test_derived_image_shares_the_port_and_leaves_the_image_trusted(
    torpor_home: Path, tmp_path: Path
) -> None:
    files_img = _img(FILES, [_reg(1, "/tmp/x"), _inet(2, LISTEN, OPTS)])
    image = _server_image(tmp_path / "images", files_img)
    assert image.trusted()
    copies = _copies.Copies(image, 3)
    assert copies.derives
    with copies.images_dir() as derived:
        assert derived.parent == torpor_home / "cache" / "derived"
        assert stat.S_IMODE(derived.stat().st_mode) == 0o700
        files = derived / "files.img"
        assert not files.is_symlink() and stat.S_IMODE(files.stat().st_mode) == 0o600
        assert files.read_bytes() == _copies.with_reuseport(files_img)[0]
        others = sorted(p.name for p in derived.iterdir() if p.name != "files.img")
        assert others == sorted(f.name for f in image.manifest.files if f.name != "files.img")
        for name in others:
            assert os.readlink(derived / name) == str((image.path / name).absolute())
        assert _copies.read_facts(derived).solo_listeners == 0
    assert not derived.exists()
    # Symlinks, not hard links: the image's files keep their ctime, so it stays trusted.
    assert image.trusted()


def test_when_copies_are_derived(torpor_home: Path, tmp_path: Path) -> None:
    image = _server_image(tmp_path / "a", _img(FILES, [_inet(1, LISTEN, OPTS)]))
    assert [_copies.Copies(image, k).derives for k in (1, 2)] == [False, True]
    assert _copies.Copies(image, 1, reuseport=True).derives
    assert not _copies.Copies(image, 3, reuseport=False).derives
    with _copies.Copies(image, 1).images_dir() as path:
        assert path == image.path
    shared = _server_image(tmp_path / "b", _img(FILES, [_inet(1, LISTEN, OPTS_WITH_REUSEPORT)]))
    assert not _copies.Copies(shared, 3).derives  # already shares its port (the demo app)


def test_a_files_img_changed_after_verification_is_not_derived_from(
    torpor_home: Path, tmp_path: Path
) -> None:
    image = _server_image(tmp_path / "images", _img(FILES, [_inet(1, LISTEN, OPTS)]))
    (image.path / "files.img").write_bytes(_img(FILES, [_inet(1, LISTEN, OPTS + _num(9, 1))]))
    with pytest.raises(ImageCorruptedError) as info, _copies.reuseport_image(image):
        pass
    assert str(info.value) == (
        f"{image.path}/files.img does not match its SHA-256 — the image is damaged; "
        "checkpoint again"
    )
    assert list((torpor_home / "cache" / "derived").iterdir()) == []


def test_derived_images_of_dead_keepers_are_swept(torpor_home: Path, tmp_path: Path) -> None:
    image = _server_image(tmp_path / "images", _img(FILES, [_inet(1, LISTEN, OPTS)]))
    parent = torpor_home / "cache" / "derived"
    parent.mkdir(parents=True, mode=0o700)
    dead = parent / "999999999-abc"  # beyond pid_max: never a live process
    dead.mkdir()
    (dead / "files.img").write_bytes(b"x")
    alive = parent / f"{os.getpid()}-abc"
    alive.mkdir()
    with _copies.reuseport_image(image):
        pass
    assert sorted(p.name for p in parent.iterdir()) == [alive.name]


def test_criu_errors_name_the_image_not_the_derived_directory(
    torpor_home: Path, tmp_path: Path
) -> None:
    image = _server_image(tmp_path / "images", _img(FILES, [_inet(1, LISTEN, OPTS)]))
    copies = _copies.Copies(image, 2)
    with copies.images_dir() as derived, pytest.raises(RestoreError) as info, copies.criu_turn():
        raise RestoreError(f"restore of image {derived} failed: x", image=derived)
    assert info.value.msg == f"restore of image {image.path} failed: x"
    assert info.value.image == str(image.path)


# -- hints for what copies run into ----------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "hint"),
    [
        (
            "files-reg.c:467: Can't create ghost regfile: File exists",
            "the ghost file CRIU recreates for a deleted-but-open file (<path>.cr.<id>.ghost) "
            "was there already: a restore outside torpor was making it, or a killed restore "
            "left it; retry, or delete the leftover",
        ),
        (
            "soccr/soccr.c:529: Can't connect inet socket back: Cannot assign requested address",
            "the image's TCP connection still exists (a restored copy holds it, or it lingers): "
            "restore with --tcp-close to bring it back closed",
        ),
        (
            "sk-inet.c:912: inet: Connected TCP socket in image",
            "the image holds an established TCP connection: restore with --tcp-established (it "
            "resumes) or --tcp-close (it comes back closed)",
        ),
        (
            "sk-inet.c:1059: inet: Can't bind inet socket (id 14): Address already in use",
            "a port the image binds is taken (is the original still running?): stop it; "
            "restored copies share a listening port only with each other",
        ),
    ],
)
def test_restore_failures_of_copies_get_the_right_hint(line: str, hint: str) -> None:
    from torpor._engine._criu import _hint_for

    assert _hint_for([line]) == hint
