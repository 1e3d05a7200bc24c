"""Every local image torpor made, without CRIU: the image index (``_images._index``), what
``torpor images`` lists and in which state (store, ``-o`` paths, incomplete, broken,
missing), ``torpor image delete`` / ``prune`` of local images and what they refuse, the
restore hint for an incomplete image, and self-dumps' records, reserve and failed seals
(``_process._finalize``)."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from integration.helpers import LOCAL_IMAGES_COLUMNS, parse_table

from torpor._cli import main
from torpor._cli._app import human_bytes
from torpor._errors import DumpError, ImageError
from torpor._images import _image, _incomplete, _index
from torpor._images._image import Staging
from torpor._images._incomplete import (
    IN_USE,
    INCOMPLETE,
    RECORD_NAME,
    RESERVE_NAME,
    STALE,
    IncompleteImageError,
    Record,
)
from torpor._process._finalize import ImageFacts, Pending, finalize
from torpor._process._proc import ref
from torpor._safe import SPARE_PREFIX

from ._staging import leftover
from .test_pool_support import make_image

COLUMNS = LOCAL_IMAGES_COLUMNS


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def images(capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, dict[str, str]], str]:
    code, out, err = run(capsys, "images")
    assert code == 0, err
    return parse_table(out, COLUMNS), err


def states(capsys: pytest.CaptureFixture[str]) -> dict[str, tuple[str, str]]:
    """NAME -> (PATH, STATE) of ``torpor images``."""
    return {k: (r["PATH"], r["STATE"]) for k, r in images(capsys)[0].items()}


def _leftover(parent: Path, dest: str, *, done: bool = True, **changes: Any) -> Path:
    """A staging directory a checkpoint left: its record, CRIU's files, and (``done``)
    CRIU's success mark."""
    return leftover(parent, dest, marks=("stats-dump",) if done else (), **changes)


# -- the index ---------------------------------------------------------------------------------


def test_index_entries_are_private_files_named_by_the_path(
    torpor_home: Path, tmp_path: Path
) -> None:
    _index.add(tmp_path / "a" / ".." / "img")
    _index.add(tmp_path / "img")  # the same path: one entry
    _index.add(torpor_home / "images" / "web")  # in the store: listed without the index
    index = torpor_home / "index"
    (entry,) = os.listdir(index)
    assert entry == _index.entry_name(tmp_path / "img")
    assert json.loads((index / entry).read_text()) == {"path": str(tmp_path / "img")}
    assert stat.S_IMODE(index.stat().st_mode) == 0o700
    assert stat.S_IMODE((index / entry).stat().st_mode) == 0o600
    assert _index.entries().paths == (tmp_path / "img",)
    assert _index.known(tmp_path / "img") and not _index.known(tmp_path / "other")
    assert _index.forget(tmp_path / "img") and not _index.forget(tmp_path / "img")
    assert _index.entries().paths == ()


def test_planted_index_entries_are_reported_and_never_followed(
    torpor_home: Path, tmp_path: Path
) -> None:
    _index.add(tmp_path / "good")
    index = torpor_home / "index"
    target = tmp_path / "secret"
    target.write_text(json.dumps({"path": str(tmp_path / "evil")}))
    planted = {
        "link.json": lambda p: os.symlink(target, p),
        "fifo.json": lambda p: os.mkfifo(p),
        "bytes.json": lambda p: p.write_bytes(b"\xff{"),
        "huge.json": lambda p: p.write_bytes(b" " * 10_000),
        "relative.json": lambda p: p.write_text(json.dumps({"path": "img"})),
        "dotdot.json": lambda p: p.write_text(json.dumps({"path": f"{tmp_path}/x/../y"})),
        "extra.json": lambda p: p.write_text(json.dumps({"path": "/x", "more": 1})),
        _index.entry_name(Path("/x")): lambda p: p.write_text(json.dumps({"path": "/etc"})),
    }
    for name, plant in planted.items():
        plant(index / name)
    found = _index.entries()
    assert found.paths == (tmp_path / "good",)
    x = _index.entry_name(Path("/x"))
    assert sorted(found.problems) == sorted(
        [
            f"index entry {index / 'bytes.json'} is not JSON; ignored",
            f"index entry {index / 'dotdot.json'} holds '{tmp_path}/x/../y', not a normalised "
            "absolute path; ignored",
            f'index entry {index / "extra.json"} is not {{"path": PATH}}; ignored',
            f"index entry {index / 'fifo.json'} cannot be read ({index}: file fifo.json is a FIFO, "
            "not a regular file; refused); ignored",
            f"index entry {index / 'huge.json'} cannot be read ({index}: file huge.json has 10000 "
            "bytes or more, over the 8192 this file may have; refused); ignored",
            f"index entry {index / 'link.json'} cannot be read ({index}: file link.json is a "
            "symlink, not a regular file; refused); ignored",
            f"index entry {index / 'relative.json'} holds 'img', not a normalised absolute path; "
            "ignored",
            f"index entry {index / x} names '/etc', whose entry has another name; ignored",
        ]
    )
    assert target.read_text() == json.dumps({"path": str(tmp_path / "evil")})


def test_an_index_another_user_could_change_is_refused(torpor_home: Path) -> None:
    (torpor_home / "index").mkdir(mode=0o700)
    os.chmod(torpor_home / "index", 0o777)
    with pytest.raises(Exception) as exc:
        _index.entries()
    assert str(exc.value) == (
        f"image index {torpor_home / 'index'} is writable by others (mode 0777); refused — "
        f"chmod go-w {torpor_home / 'index'}"
    )
    assert _index.try_add("/x") == str(exc.value)  # a dump goes on without its entry


# -- torpor images -----------------------------------------------------------------------------


def test_images_lists_the_store_and_the_indexed_paths_with_their_state(
    torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = torpor_home / "images"
    web = make_image(store, "web", b"p" * 8192)
    out = make_image(tmp_path / "data", "golden", b"q" * 8192)
    _index.add(out.path)
    rows, err = images(capsys)
    assert err == ""
    assert rows == {
        "web": {
            "NAME": "web",
            "ID": web.manifest.id[:12],
            "CREATED": web.manifest.created[:19],
            "SIZE": human_bytes(web.manifest.total_bytes),
            "PID": "4242",
            "COMMAND": "python3 app.py",
            "PATH": str(store / "web"),
            "STATE": "ok",
        },
        "golden": {
            "NAME": "golden",
            "ID": out.manifest.id[:12],
            "CREATED": out.manifest.created[:19],
            "SIZE": human_bytes(out.manifest.total_bytes),
            "PID": "4242",
            "COMMAND": "python3 app.py",
            "PATH": str(tmp_path / "data" / "golden"),
            "STATE": "ok",
        },
    }
    _, out_json, _ = run(capsys, "images", "--json")
    listed = {row["name"]: (row["path"], row["state"]) for row in json.loads(out_json)}
    assert listed == {
        "web": (str(store / "web"), "complete"),
        "golden": (str(tmp_path / "data" / "golden"), "complete"),
    }


def test_broken_images_are_listed_with_why(
    torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = torpor_home / "images"
    make_image(store, "short", b"p" * 8192)
    with open(store / "short" / "pages-1.img", "r+b") as fh:
        fh.truncate(100)
    make_image(store, "gone", b"p" * 8192)
    (store / "gone" / "mm-1.img").unlink()
    make_image(store, "open", b"p" * 8192)
    os.chmod(store / "open", 0o777)
    (store / "empty").mkdir()
    os.symlink(tmp_path, store / "link")
    (store / "file").write_text("x")
    elsewhere = make_image(tmp_path / "d", "sig", b"p" * 8192)
    manifest = json.loads((elsewhere.path / "torpor.json").read_text())
    (elsewhere.path / "torpor.json").write_text(json.dumps({**manifest, "pid": 1}))
    _index.add(elsewhere.path)
    assert states(capsys) == {
        "short": (str(store / "short"), "broken: file pages-1.img has 100 bytes, expected 8192"),
        "gone": (
            str(store / "gone"),
            "broken: does not hold the files its manifest lists: mm-1.img missing",
        ),
        "open": (str(store / "open"), "broken: is writable by others (mode 0777); refused"),
        "empty": (str(store / "empty"), "broken: is not a torpor image (no torpor.json)"),
        "link": (str(store / "link"), "broken: is a symlink, not a directory"),
        "file": (str(store / "file"), "broken: is not a directory"),
        "sig": (
            str(elsewhere.path),
            f"broken: torpor.sig does not match its manifest (signed by key "
            f"{elsewhere.signer}): the manifest was changed after it was signed; refused",
        ),
    }
    _, out, _ = run(capsys, "images", "--json")
    assert {r["name"]: r.get("problem") for r in json.loads(out)}["file"] == "is not a directory"


def test_incomplete_images_anywhere_are_listed_and_stale_leftovers_removed(
    torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = torpor_home / "images"
    store.mkdir(mode=0o700)
    here = _leftover(store, "inc")
    there = _leftover(tmp_path / "out", "far", created="2026-01-02T00:00:00.000000+00:00")
    _index.add(tmp_path / "out" / "far")
    stale = _leftover(tmp_path / "out", "never", done=False)
    _index.add(tmp_path / "out" / "never")
    rows, err = images(capsys)
    assert {k: (r["ID"], r["PID"], r["PATH"], r["STATE"]) for k, r in rows.items()} == {
        "inc": ("", "4242", str(here), "incomplete"),
        "far": ("", "4242", str(there), "incomplete"),
    }
    assert err == (
        f"torpor: warning: image 'inc' is incomplete (kept at {here}): "
        "`torpor image repair inc` finishes it\n"
        f"torpor: warning: image 'far' is incomplete (kept at {there}): "
        f"`torpor image repair {there}` finishes it\n"
    )
    assert not stale.exists()  # its dump never succeeded: swept
    assert _index.entries().paths == (tmp_path / "out" / "far",)  # and its entry dropped


def test_a_deleted_image_is_forgotten_and_one_whose_disk_is_gone_is_missing(
    torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = make_image(tmp_path / "d1", "a", b"p" * 4096)
    b = make_image(tmp_path / "d2" / "disk", "b", b"p" * 4096)
    _index.add(a.path)
    _index.add(b.path)
    subprocess.run(["rm", "-rf", str(a.path), str(b.path.parent)], check=True)
    assert states(capsys) == {"b": (str(b.path), "missing")}
    assert _index.entries().paths == (b.path,)
    _, err = images(capsys)
    assert err == (
        f"torpor: warning: image {b.path} is missing ({b.path.parent} is gone too): "
        f"`torpor image delete {b.path}` forgets it\n"
    )
    forgot = f"forgot {b.path} (its directory is gone)\n"
    assert run(capsys, "image", "delete", str(b.path)) == (0, "", forgot)
    assert states(capsys) == {} and _index.entries().paths == ()


def test_a_staging_directory_being_written_keeps_its_entry(
    torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    st = Staging(tmp_path / "img")
    st.create()  # the checkpointer has not written its record yet
    _index.add(st.dest)
    assert states(capsys) == {}
    assert _index.entries().paths == (st.dest,)


# -- restore of an incomplete image ------------------------------------------------------------


def test_restore_of_an_incomplete_image_says_how_to_repair_it(
    torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = torpor_home / "images"
    store.mkdir(mode=0o700)
    here = _leftover(store, "inc")
    there = _leftover(tmp_path, "far")
    code, _, err = run(capsys, "restore", "inc")
    assert (code, err) == (
        1,
        f"torpor: error: image 'inc' is incomplete: its checkpoint could not finish it (kept at "
        f"{here}) — `torpor image repair inc` finishes it\n",
    )
    code, _, err = run(capsys, "restore", str(tmp_path / "far"))
    assert (code, err) == (
        1,
        f"torpor: error: image '{tmp_path / 'far'}' is incomplete: its checkpoint could not "
        f"finish it (kept at {there}) — `torpor image repair {tmp_path / 'far'}` finishes it\n",
    )
    code, _, err = run(capsys, "restore", str(there))
    assert (code, err) == (
        1,
        f"torpor: error: image '{there}' is incomplete: its checkpoint could not finish it "
        f"(kept at {there}) — `torpor image repair {there}` finishes it\n",
    )


# -- delete and prune --------------------------------------------------------------------------


def test_delete_removes_local_images_by_name_and_path(
    torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = torpor_home / "images"
    make_image(store, "web", b"p" * 4096)
    out = make_image(tmp_path, "golden", b"p" * 4096)
    _index.add(out.path)
    inc = _leftover(store, "inc")
    assert run(capsys, "image", "delete", "web") == (0, "", f"deleted {store / 'web'}\n")
    assert run(capsys, "image", "delete", str(out.path)) == (0, "", f"deleted {out.path}\n")
    assert run(capsys, "image", "delete", "inc") == (0, "", f"deleted {inc}\n")
    assert sorted(os.listdir(store)) == [] and not out.path.exists()
    assert _index.entries().paths == ()
    code, _, err = run(capsys, "image", "delete", "web")
    assert (code, err) == (
        1,
        "torpor: error: no local image named 'web' — `torpor images` lists local images; an "
        "image in a pool is NAME@POOL\n",
    )


def test_delete_refuses_what_is_not_a_torpor_image_of_its_own(
    torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = torpor_home / "images"
    make_image(store, "open", b"p" * 4096)
    os.chmod(store / "open", 0o775)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "data").write_text("keep")
    victim = make_image(tmp_path / "v", "victim", b"p" * 4096)
    os.symlink(victim.path, store / "link")
    make_image(tmp_path, "nested", b"p" * 4096)
    (tmp_path / "nested" / "sub").mkdir()
    busy = _leftover(tmp_path, "busy")
    refusals = {
        "open": f"image directory {store / 'open'} is writable by its group (mode 0775): not "
        f"one torpor can tell is its own; not deleted — chmod go-w {store / 'open'}",
        str(tmp_path / "plain"): f"{tmp_path / 'plain'} is not a torpor image (no torpor.json);"
        " not deleted — torpor deletes only the images it made",
        "link": f"{store / 'link'} is a symlink, not an image directory; not deleted — torpor "
        "never follows it; remove the symlink itself if it is not wanted",
        str(tmp_path / "nested"): f"{tmp_path / 'nested'} holds a directory (sub), which no "
        "torpor image does; not deleted — torpor deletes only the images it made",
        str(busy): f"{busy} is being written by a checkpoint; not deleted — wait for it to end, "
        "then look at `torpor images`",
    }
    fd = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert _incomplete.lock(fd, wait=False)  # a checkpointer writing it
        for arg, message in refusals.items():
            assert run(capsys, "image", "delete", arg) == (1, "", f"torpor: error: {message}\n")
    finally:
        os.close(fd)
    assert (store / "open" / "torpor.json").exists() and (tmp_path / "plain" / "data").exists()
    assert victim.path.is_dir() and (tmp_path / "nested" / "torpor.json").exists()
    assert busy.is_dir()


def test_prune_keeps_the_newest_of_each_program(
    torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = torpor_home / "images"
    made = [make_image(store, f"web-{i}", b"p" * 4096) for i in range(3)]
    others = [make_image(store, f"db-{i}", b"p" * 4096, cmdline=("postgres",)) for i in range(3)]
    far = make_image(tmp_path, "web-far", b"p" * 4096)  # the newest web
    _index.add(far.path)
    inc = _leftover(store, "web-inc")
    make_image(store, "web-broken", b"p" * 4096)
    (store / "web-broken" / "mm-1.img").unlink()
    code, out, err = run(capsys, "image", "prune", "--keep", "2", "web-")
    assert (code, out) == (0, f"deleted {made[1].path}\ndeleted {made[0].path}\n"), err
    dbs = {"db-0", "db-1", "db-2"}
    assert set(states(capsys)) == {"web-2", "web-far", "web-inc", "web-broken", *dbs}
    code, out, _ = run(capsys, "image", "prune")  # --keep 1, every program
    assert (code, out) == (
        0,
        f"deleted {made[2].path}\ndeleted {others[1].path}\ndeleted {others[0].path}\n",
    )
    assert set(states(capsys)) == {"web-far", "db-2", "web-inc", "web-broken"}
    assert inc.is_dir() and others[2].path.is_dir()
    code, _, err = run(capsys, "image", "prune", "--gc")
    assert (code, err) == (
        1,
        "torpor: error: --gc garbage-collects a pool: give --pool POOL\n",
    )


# -- self-dumps: record, reserve, failed seals -------------------------------------------------

FACTS = ImageFacts(name="web", pid=os.getpid(), cmdline=("app",), rss_bytes=1, criu_version="4")


def _dumped(parent: Path, dest: str = "img") -> tuple[Path, int]:
    """A staging directory prepared by a self-dump and written by 'CRIU'; its fd."""
    st = Staging(parent / dest)
    st.create()
    fd = os.open(st.path, os.O_RDONLY | os.O_DIRECTORY)
    Pending(dest=dest, facts=FACTS, leave_running=False).write(fd)
    for name in ("inventory.img", "pstree.img", "pages-1.img", "stats-dump"):
        (st.path / name).write_bytes(name.encode() * 100)
    return st.path, fd


def test_a_self_dump_records_reserves_and_indexes_before_criu(
    torpor_home: Path, tmp_path: Path
) -> None:
    staging, fd = _dumped(tmp_path)
    try:
        record = Record.read(fd, source="s")
    finally:
        os.close(fd)
    me = ref(os.getpid())
    assert (record.dest, record.pid, record.start_time) == ("img", me.pid, me.start_time)
    assert (record.coordinated, record.held_by_process, record.leave_running) == (
        True,
        True,
        False,
    )
    assert (staging / RESERVE_NAME).is_file()
    spares = sorted(staging.glob(f"{SPARE_PREFIX}*"))
    assert [p.name for p in spares] == [f"{SPARE_PREFIX}{i}" for i in range(3)]
    assert sum(p.stat().st_blocks * 512 for p in spares) >= (64 + 8) << 10
    assert _index.entries().paths == (tmp_path / "img",)


def test_a_self_dump_held_by_a_living_process_is_in_use_then_incomplete(
    torpor_home: Path, tmp_path: Path
) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        path = _leftover(
            tmp_path,
            "img",
            pid=sleeper.pid,
            start_time=ref(sleeper.pid).start_time,
            held_by_process=True,
        )
        assert [left.state for left in _incomplete.scan(tmp_path)] == [IN_USE]
        with pytest.raises(ImageError, match="still being written"):
            _incomplete.repair(_incomplete.find(str(path), tmp_path))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert [left.state for left in _incomplete.scan(tmp_path)] == [INCOMPLETE]
    _leftover(tmp_path, "gone", done=False, pid=sleeper.pid, held_by_process=True)
    assert sorted(left.state for left in _incomplete.scan(tmp_path)) == [INCOMPLETE, STALE]


def test_a_disk_without_room_for_the_reserve_refuses_the_self_dump_in_one_line(
    torpor_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    st = Staging(tmp_path / "img")
    st.create()
    fd = os.open(st.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(DumpError) as exc:
            Pending(dest="img", facts=FACTS, leave_running=False).write(fd)
    finally:
        os.close(fd)
    mount = _incomplete.mount_point(tmp_path)
    assert str(exc.value).startswith(
        f"checkpoint of pid {os.getpid()} refused: no space left on {mount} ("
    )
    assert str(exc.value).endswith(
        "free), where its image goes (nothing was done; the process keeps running) — free "
        f"space on {mount}, or checkpoint to another disk"
    )
    assert os.listdir(st.path) == []


def test_a_seal_that_hits_a_full_disk_leaves_an_image_that_is_listed_and_repaired(
    torpor_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    staging, fd = _dumped(tmp_path)
    os.close(fd)
    real = _image.replace_file
    calls: list[str] = []

    def full(dir_fd: int, name: str, data: bytes, **kwargs: Any) -> None:
        calls.append(name)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_image, "replace_file", full)
    with pytest.raises(IncompleteImageError) as exc:
        finalize(staging)
    mount = _incomplete.mount_point(tmp_path)
    assert calls == ["torpor.json"]
    assert str(exc.value).startswith(
        f"checkpoint of pid {os.getpid()} stopped the process but could not finish its image: "
        f"no space left on {mount} ("
    )
    assert str(exc.value).endswith(
        f"; the image is kept at {staging} — free space on {mount}, then `torpor image repair "
        f"{staging}` finishes it"
    )
    monkeypatch.setattr(_image, "replace_file", real)
    # Listed once its process is gone (here it lives: in use, not listed).
    assert states(capsys) == {}
    monkeypatch.setattr(_incomplete, "_alive", lambda pid, start: False)
    assert states(capsys) == {"web": (str(staging), "incomplete")}
    code, out, err = run(capsys, "image", "repair", str(staging))
    assert (code, out) == (0, f"{tmp_path / 'img'}\n"), err
    assert states(capsys) == {"web": (str(tmp_path / "img"), "ok")}
    assert set(os.listdir(tmp_path / "img")) & {RECORD_NAME, RESERVE_NAME} == set()
