"""Image directories: manifests, staging, verification, names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torpor._errors import (
    AlreadyExistsError,
    ImageCorruptedError,
    ImageError,
    NotFoundError,
    UsageError,
)
from torpor._images import _manifest
from torpor._images._image import Image, Staging, hash_files, staging
from torpor._images._store import check_name, list_local, resolve

REQUIRED = {"inventory.img": b"inventory", "pstree.img": b"pstree"}


def _stage(dest: Path, files: dict[str, bytes]) -> Image:
    """A committed image of ``files`` plus the two every CRIU image has."""
    with staging(dest) as st:
        for name, data in {**REQUIRED, **files}.items():
            (st.path / name).write_bytes(data)
        return st.commit(
            lambda entries: _manifest.build(
                name=dest.name,
                pid=42,
                files=entries,
                criu_version="4.2.1",
                cmdline=["python", "app.py"],
                rss_bytes=1 << 20,
            )
        )


def test_manifest_round_trip() -> None:
    m = _manifest.build(
        name="x",
        pid=1,
        files=[_manifest.FileEntry("b", 2, "0" * 64), _manifest.FileEntry("a", 1, "1" * 64)],
        criu_version="4.2.1",
        cmdline=["a", "b"],
        rss_bytes=5,
        labels={"k": "v"},
    )
    again = _manifest.Manifest.from_json(m.to_json())
    assert again == m
    assert [f.name for f in m.files] == ["a", "b"]
    assert m.total_bytes == 3


def test_manifest_from_the_future_is_refused() -> None:
    text = (
        _manifest.build(name="x", pid=1, files=[], criu_version="4.2.1", cmdline=[], rss_bytes=0)
        .to_json()
        .replace('"format": 1', '"format": 99')
    )
    with pytest.raises(ImageError, match="newer"):
        _manifest.Manifest.from_json(text)


def test_malformed_manifest_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="malformed"):
        _manifest.Manifest.from_json("{}")


def test_commit_writes_private_manifest_and_verifies(tmp_path: Path) -> None:
    img = _stage(tmp_path / "img", {"pages-1.img": os.urandom(100_000), "core-1.img": b"core"})
    assert (tmp_path / "img" / "torpor.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "img").stat().st_mode & 0o777 == 0o700
    reopened = Image.open(tmp_path / "img")
    assert reopened.manifest == img.manifest
    reopened.verify()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_verify_names_the_bad_file(tmp_path: Path, damage: str, full: bool) -> None:
    _stage(tmp_path / "img", {"pages-1.img": os.urandom(50_000), "core-1.img": b"core"})
    target = tmp_path / "img" / "pages-1.img"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[123] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-1]))
    else:
        target.unlink()
    with pytest.raises(ImageCorruptedError, match=r"pages-1\.img") as info:
        Image.open(tmp_path / "img").verify(full=full)
    assert info.value.file == "pages-1.img"


def test_staging_refuses_existing_destination(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(AlreadyExistsError, match="exists already"):
        Staging(tmp_path / "taken").create()


def test_failed_staging_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), staging(tmp_path / "img") as st:
        (st.path / "pages-1.img").write_bytes(b"x")
        raise RuntimeError("dump failed")
    assert list(tmp_path.iterdir()) == []


def test_directory_without_manifest_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    with pytest.raises(ImageError, match=r"no torpor\.json"):
        Image.open(tmp_path / "half")


def test_hash_files_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    (tmp_path / "a").write_bytes(b"hello")
    (tmp_path / "b").write_bytes(b"")
    got = {e.name: e.sha256 for e in hash_files(tmp_path, ["a", "b"])}
    assert got == {"a": hashlib.sha256(b"hello").hexdigest(), "b": hashlib.sha256(b"").hexdigest()}


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 200, "a..b", "sp ace"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(UsageError):
        check_name(bad)


def test_store_resolves_names_and_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORPOR_HOME", str(tmp_path))
    _stage(tmp_path / "images" / "one", {"f": b"1"})
    (tmp_path / "images" / ".two.partial-abcd").mkdir()
    assert resolve("one") == tmp_path / "images" / "one"
    assert [i.name for i in list_local()] == ["one"]
    with pytest.raises(NotFoundError):
        resolve("missing")


def test_fresh_image_is_trusted_without_rehashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = _stage(tmp_path / "img", {"pages-1.img": os.urandom(10_000)})
    assert img.trusted()

    def no_hashing(*args: object) -> None:
        raise AssertionError("an unchanged image must not be re-hashed")

    monkeypatch.setattr("torpor._images._image.hash_files", no_hashing)
    Image.open(tmp_path / "img").verify()


def test_any_write_voids_the_stamp_and_full_verify_rehashes(tmp_path: Path) -> None:
    img = _stage(tmp_path / "img", {"pages-1.img": os.urandom(10_000)})
    target = tmp_path / "img" / "pages-1.img"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[5] ^= 1
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    assert not img.trusted()
    with pytest.raises(ImageCorruptedError, match=r"pages-1\.img"):
        img.verify()
    data[5] ^= 1
    target.write_bytes(bytes(data))
    img.verify()  # good again: re-hashed, and the stamp is renewed
    assert img.trusted()
    img.verify(full=True)


def test_full_verify_rehashes_what_the_stamp_trusts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit rot: bytes change while inode, size and times stay as the stamp recorded them. A plain
    verify trusts the stamp; only a full one re-hashes, and names the file."""
    img = _stage(tmp_path / "img", {"pages-1.img": os.urandom(10_000), "core-1.img": b"core"})
    target = tmp_path / "img" / "pages-1.img"
    data = bytearray(target.read_bytes())
    data[5] ^= 1
    target.write_bytes(bytes(data))
    # The stamp renewed for the file as it now is: what a verify just before the rot left.
    with monkeypatch.context() as m:
        m.setattr("torpor._images._image.hash_files", lambda *a, **k: list(img.manifest.files))
        img.verify()
    assert img.trusted()
    Image.open(tmp_path / "img").verify()
    with pytest.raises(ImageCorruptedError, match=r"file pages-1\.img does not match") as info:
        Image.open(tmp_path / "img").verify(full=True)
    assert info.value.file == "pages-1.img"


def test_a_failed_full_verify_voids_the_stamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a full verify found rot, a later plain verify must not trust the stamp again."""
    img = _stage(tmp_path / "img", {"pages-1.img": os.urandom(10_000), "core-1.img": b"core"})
    target = tmp_path / "img" / "pages-1.img"
    data = bytearray(target.read_bytes())
    data[7] ^= 1
    target.write_bytes(bytes(data))
    with monkeypatch.context() as m:
        m.setattr("torpor._images._image.hash_files", lambda *a, **k: list(img.manifest.files))
        img.verify()
    assert img.trusted()
    with pytest.raises(ImageCorruptedError, match=r"file pages-1\.img does not match"):
        Image.open(tmp_path / "img").verify(full=True)
    assert Image.open(tmp_path / "img").trusted() is False
    with pytest.raises(ImageCorruptedError, match=r"file pages-1\.img does not match"):
        Image.open(tmp_path / "img").verify()
