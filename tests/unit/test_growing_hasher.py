"""Hashing a dump's page files while they are written (``GrowingHasher``)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from torpor._images._image import GrowingHasher, Staging, hash_files
from torpor._images._manifest import FileEntry


def _append_slowly(path: Path, chunks: list[bytes]) -> threading.Thread:
    def write() -> None:
        with open(path, "wb") as fh:  # created once, then only appended to, as CRIU does
            for chunk in chunks:
                fh.write(chunk)
                fh.flush()
                time.sleep(0.003)

    t = threading.Thread(target=write)
    t.start()
    return t


def test_a_file_written_whole_before_the_end_is_hashed_whole(tmp_path: Path) -> None:
    # Much more than one bounded step, all of it there when the writer says it is done.
    data = os.urandom(1 << 20) * 200
    (tmp_path / "pages-1.img").write_bytes(data)
    with GrowingHasher(tmp_path) as hasher:
        entries = hasher.entries()  # at once: the hasher has (nearly) all of it still to read
    assert entries == {"pages-1.img": FileEntry("pages-1.img", len(data), _sha(data))}


def test_a_file_appended_to_is_hashed_whole(tmp_path: Path) -> None:
    chunks = [os.urandom(64 << 10) for _ in range(40)]
    with GrowingHasher(tmp_path) as hasher:
        writer = _append_slowly(tmp_path / "pages-1.img", chunks)
        time.sleep(0.01)
        (tmp_path / "core-1.img").write_bytes(b"not a page file")
        writer.join()
        entries = hasher.entries()
    data = b"".join(chunks)
    assert entries == {
        "pages-1.img": FileEntry("pages-1.img", len(data), hashlib.sha256(data).hexdigest())
    }


def test_a_file_replaced_or_shrunk_is_never_vouched_for_wrongly(tmp_path: Path) -> None:
    sizes = {"pages-1.img": 100_000, "pages-2.img": 100_000, "pages-3.img": 10, "pages-4.img": 10}
    with GrowingHasher(tmp_path) as hasher:
        for name, size in sizes.items():
            (tmp_path / name).write_bytes(name[6:7].encode() * size)
        # Once the hasher has read all four to their end (its own record: no public view of it),
        # it knows old contents: pages-1 is then rewritten under a new inode, pages-3 truncated.
        wait_for_hasher(hasher, sizes)
        os.replace(tmp_path / "pages-2.img", tmp_path / "pages-1.img")
        with open(tmp_path / "pages-3.img", "r+b") as fh:
            fh.truncate(5)
        entries = hasher.entries()
    # Only the file left alone is vouched for; the others are left to be hashed after.
    assert entries == {"pages-4.img": FileEntry("pages-4.img", 10, _sha(b"4" * 10))}


def wait_for_hasher(hasher: GrowingHasher, sizes: dict[str, int]) -> None:
    deadline = time.monotonic() + 10
    while {name: offset for name, (_, _, offset) in hasher._files.items()} != sizes:
        assert time.monotonic() < deadline, "the hasher did not read the files"
        time.sleep(0.002)


def test_a_failed_writer_stops_the_hasher_at_once(tmp_path: Path) -> None:
    (tmp_path / "pages-1.img").write_bytes(b"\0" * (64 << 20))
    t0 = time.monotonic()
    try:
        with GrowingHasher(tmp_path):
            raise RuntimeError("the dump failed")
    except RuntimeError:
        pass
    assert time.monotonic() - t0 < 1.0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_commit_uses_what_was_hashed_and_hashes_the_rest(tmp_path: Path) -> None:
    st = Staging(tmp_path / "img")
    st.create()
    (st.path / "pages-1.img").write_bytes(b"p" * 1000)
    (st.path / "core-1.img").write_bytes(b"c" * 10)
    (st.path / "inventory.img").write_bytes(b"i")  # what every CRIU image has
    (st.path / "pstree.img").write_bytes(b"t")
    with GrowingHasher(st.path) as hasher:
        hashed = hasher.entries()
    assert set(hashed) == {"pages-1.img"}
    seen: list[list[FileEntry]] = []

    def manifest(files: list[FileEntry]):  # type: ignore[no-untyped-def]
        from torpor._images import _manifest

        seen.append(files)
        return _manifest.build(
            name="t", pid=1, files=files, criu_version="4.2.1", cmdline=("x",), rss_bytes=1
        )

    image = st.commit(manifest, hashed)
    names = ["core-1.img", "inventory.img", "pages-1.img", "pstree.img"]
    assert seen[0] == hash_files(image.path, names)
    image.verify(full=True)
