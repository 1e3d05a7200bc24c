"""Integrity: tampered or missing data is detected and named before anything is restored;
interrupted uploads never leave a manifest behind; local files are private."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._errors import (
    AlreadyExistsError,
    ImageCorruptedError,
    ImageNotFoundError,
    PoolError,
)
from torpor._pools import MemoryBackend, Pool
from torpor._pools._pack import PackIndex, index_key, pack_key
from torpor._pools._record import image_key, list_key

from .test_pool_support import FAST, PAGE, make_image, new_mem_pool, random_pages


@pytest.fixture
def pool(torpor_home: Path) -> Iterator[Pool]:
    p = new_mem_pool()
    yield p
    p.close()


@pytest.fixture
def pushed(pool: Pool, tmp_path: Path) -> bytes:
    pages = bytes(random_pages(600, seed=5))
    pool.push(make_image(tmp_path, "src", pages), "web")
    return pages


def _backend(pool: Pool) -> MemoryBackend:
    assert isinstance(pool.backend, MemoryBackend)
    return pool.backend


def _only_pack(pool: Pool) -> tuple[str, PackIndex]:
    backend = _backend(pool)
    (key,) = backend.list("index/")
    pack_id = key.split("/")[-1]
    return pack_id, PackIndex.decode(pack_id, backend.get(key))


def test_pull_round_trip_and_private_files(pool: Pool, pushed: bytes) -> None:
    image = pool.pull("web")
    image.verify()
    assert (image.path / "pages-1.img").read_bytes() == pushed
    assert image.name == "web"
    assert stat.S_IMODE(image.path.stat().st_mode) == 0o700
    local = {f.name: stat.S_IMODE(f.stat().st_mode) for f in image.path.iterdir()}
    assert set(local) >= {e.name for e in image.manifest.files} | {"torpor.json"}
    assert set(local.values()) == {0o600}, local
    pack_id, _ = _only_pack(pool)
    index = image.path.parent.parent / "index"
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in index.iterdir()} == {pack_id: 0o600}


def test_a_flipped_byte_in_a_pack_is_named(pool: Pool, pushed: bytes) -> None:
    backend = _backend(pool)
    pack_id, idx = _only_pack(pool)
    data = bytearray(backend.get(pack_key(pack_id)))
    # flip a byte inside the chunk of page 123 of pages-1.img
    page = hashlib.sha256(pushed[123 * PAGE : 124 * PAGE]).digest()
    target = next(c for c in idx.chunks if c.digest == page)
    frame = idx.frames[target.frame]
    assert frame.codec == 0  # random pages are stored raw: the byte lands in that chunk
    data[frame.offset + target.offset + 10] ^= 0x01
    backend.put(pack_key(pack_id), bytes(data))
    with pytest.raises(ImageCorruptedError) as info:
        pool.pull("web")
    err = info.value
    assert err.file == "pages-1.img"
    assert "'web'" in str(err) and "pages-1.img" in str(err) and "chunk 123 " in str(err)
    assert not list((Path(os.environ["TORPOR_HOME"]) / "cache" / "images").iterdir())


def test_a_missing_pack_is_named(pool: Pool, pushed: bytes) -> None:
    pack_id, _ = _only_pack(pool)
    _backend(pool).delete(pack_key(pack_id))
    with pytest.raises(ImageCorruptedError, match="which is missing") as info:
        pool.pull("web")
    assert info.value.file is not None


def test_a_missing_index_is_named(pool: Pool, pushed: bytes) -> None:
    pack_id, _ = _only_pack(pool)
    _backend(pool).delete(index_key(pack_id))
    with pytest.raises(ImageCorruptedError, match="is in no pack"):
        pool.pull("web")


def test_a_missing_or_damaged_chunk_list_is_named(pool: Pool, pushed: bytes) -> None:
    backend = _backend(pool)
    (key,) = backend.list("lists/")
    blob = backend.get(key)
    backend.put(key, blob[:-3])
    _drop_local_lists()  # the local cache (list objects never change) would still have it
    with pytest.raises(ImageCorruptedError, match=r"chunk list of pages-1\.img") as info:
        pool.pull("web")
    assert info.value.file == "pages-1.img"
    backend.delete(key)
    _drop_local_lists()
    with pytest.raises(ImageCorruptedError, match="missing"):
        pool.pull("web")


def _drop_local_lists() -> None:
    for f in (Path(os.environ["TORPOR_HOME"]) / "cache" / "lists").iterdir():
        f.unlink()


def test_a_damaged_manifest_is_named(pool: Pool, pushed: bytes) -> None:
    _backend(pool).put(image_key("web"), b"garbage")
    with pytest.raises(ImageCorruptedError, match="manifest of image 'web'") as info:
        pool.pull("web")
    assert "torpor image delete web@mem" in str(info.value)
    with pytest.raises(ImageCorruptedError):
        pool.gc()  # never guesses what a damaged manifest needed
    pool.delete_image("web")  # what the hint says works
    assert pool.gc().images == 0


def test_a_tampered_local_file_is_refused_at_push(pool: Pool, tmp_path: Path) -> None:
    image = make_image(tmp_path, "src", bytes(random_pages(10)))
    with open(image.path / "pages-1.img", "r+b") as fh:
        fh.write(b"X")
    with pytest.raises(ImageCorruptedError, match="does not match") as info:
        pool.push(image, "bad")
    assert info.value.file == "pages-1.img"
    assert not _backend(pool).exists(image_key("bad"))


def test_an_interrupted_upload_leaves_no_manifest(torpor_home: Path, tmp_path: Path) -> None:
    class Flaky(MemoryBackend):
        puts = 0

        def put(self, key: str, data: bytes) -> None:
            if key.startswith(("packs/", "index/", "lists/")):
                self.puts += 1
                if self.puts == 3:
                    raise PoolError("connection reset")
            super().put(key, data)

    backend = Flaky()
    pool = Pool("flaky", backend, timing=FAST)
    with pytest.raises(PoolError, match="connection reset"):
        pool.push(make_image(tmp_path, "src", bytes(random_pages(2000))), "x")
    assert not list(backend.list("images/"))
    assert not list(backend.list("sessions/"))
    stats = pool.gc()
    assert stats.packs_deleted >= 1
    assert not list(backend.list("packs/"))


def test_names_are_checked_everywhere(pool: Pool, pushed: bytes, tmp_path: Path) -> None:
    image = make_image(tmp_path, "n", b"")
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200, "a@b"):
        with pytest.raises(Exception, match="invalid image name"):
            pool.push(image, bad)
        with pytest.raises(Exception, match="invalid image name"):
            pool.pull(bad)
        with pytest.raises(Exception, match="invalid image name"):
            pool.copy_image("web", bad)
        with pytest.raises(Exception, match="invalid image name"):
            pool.delete_image(bad)


def test_existing_names_are_never_overwritten(pool: Pool, pushed: bytes, tmp_path: Path) -> None:
    with pytest.raises(AlreadyExistsError):
        pool.push(make_image(tmp_path, "again", b"x"), "web")
    with pytest.raises(AlreadyExistsError):
        pool.copy_image("web", "web")


def test_unknown_images(pool: Pool) -> None:
    for call in (pool.pull, pool.delete_image, pool.image):
        with pytest.raises(ImageNotFoundError):
            call("nope")


def test_cache_hit_is_reused_and_a_corrupted_cache_is_replaced(pool: Pool, pushed: bytes) -> None:
    first = pool.pull("web")
    again = pool.pull("web")
    assert again.path == first.path
    with open(first.path / "pages-1.img", "r+b") as fh:
        fh.write(b"\xff" * 10)
    third = pool.pull("web")
    third.verify()
    assert (third.path / "pages-1.img").read_bytes() == pushed


def test_progress_counts_every_byte(pool: Pool, pushed: bytes, tmp_path: Path) -> None:
    done: list[int] = []
    image = make_image(tmp_path, "p", pushed)
    pool.push(image, "p", progress=done.append)
    assert sum(done) == image.manifest.total_bytes
    done.clear()
    pool.pull("p", progress=done.append)
    assert sum(done) == image.manifest.total_bytes
    done.clear()
    pool.copy_image("p", "p2", progress=done.append)
    assert sum(done) == image.manifest.total_bytes


def test_a_session_declared_dead_cannot_land_its_manifest(
    pool: Pool, pushed: bytes, tmp_path: Path
) -> None:
    backend = _backend(pool)
    original = backend.put

    def put(key: str, data: bytes) -> None:
        if key.startswith("lists/"):
            for s in list(backend.list("sessions/")):
                backend.delete(s)  # what a gc does to a session it found stale
        original(key, data)

    backend.put = put  # type: ignore[method-assign]
    with pytest.raises(PoolError, match="declared this transfer dead"):
        pool.push(make_image(tmp_path, "late", bytes(random_pages(300, seed=9))), "late")
    assert not backend.exists(image_key("late"))
    assert backend.exists(list_key(next(iter(backend.list("lists/"))).split("/")[-1]))
