"""Export/import: one self-contained file per image, verified on the way in."""

from __future__ import annotations

import io
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._errors import AlreadyExistsError, ImageCorruptedError, PoolError
from torpor._pools import Pool

from .test_pool_support import make_image, new_mem_pool, random_pages


@pytest.fixture
def pools(torpor_home: Path) -> Iterator[tuple[Pool, Pool]]:
    a, b = new_mem_pool("a"), new_mem_pool("b")
    yield a, b
    a.close()
    b.close()


def test_round_trip(pools: tuple[Pool, Pool], tmp_path: Path) -> None:
    a, b = pools
    pages = bytes(random_pages(700, seed=1, zero_every=7))
    src = make_image(tmp_path, "src", pages)
    a.push(src, "web")
    out = tmp_path / "web.torpor"
    a.export_image("web", out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names[0] == "torpor-pool.json" and names[-1] == "images/web"
    assert not [n for n in names if n.startswith("sessions/")]
    imported = b.import_image(out)
    assert imported.name == "web" and imported.pool == "b"
    image = b.pull("web")
    assert (image.path / "pages-1.img").read_bytes() == pages
    assert image.manifest.cmdline == src.manifest.cmdline
    again = b.import_image(out, "web2")
    assert again.stored_bytes < 30_000  # every chunk was there already


def test_export_to_a_stream_and_import_from_one(pools: tuple[Pool, Pool], tmp_path: Path) -> None:
    a, b = pools
    a.push(make_image(tmp_path, "src", bytes(random_pages(50))), "x")
    buf = io.BytesIO()
    a.export_image("x", buf)
    buf.seek(0)
    assert b.import_image(buf, "y").name == "y"


def test_export_never_overwrites(pools: tuple[Pool, Pool], tmp_path: Path) -> None:
    a, _ = pools
    a.push(make_image(tmp_path, "src", bytes(random_pages(5))), "x")
    out = tmp_path / "taken"
    out.write_bytes(b"mine")
    with pytest.raises(AlreadyExistsError):
        a.export_image("x", out)
    assert out.read_bytes() == b"mine"


def test_a_failed_export_leaves_no_file(pools: tuple[Pool, Pool], tmp_path: Path) -> None:
    a, _ = pools
    out = tmp_path / "none"
    with pytest.raises(Exception, match="no image"):
        a.export_image("missing", out)
    assert not out.exists()


def test_a_tampered_archive_is_refused(pools: tuple[Pool, Pool], tmp_path: Path) -> None:
    a, b = pools
    a.push(make_image(tmp_path, "src", bytes(random_pages(300, seed=2))), "x")
    buf = io.BytesIO()
    a.export_image("x", buf)
    data = bytearray(buf.getvalue())
    # a byte in the middle of the pack's data (raw, random pages)
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("packs/"))
    data[member.offset_data + member.size // 2] ^= 0x40
    with pytest.raises(ImageCorruptedError) as info:
        b.import_image(io.BytesIO(bytes(data)))
    assert info.value.file == "pages-1.img"
    assert not b.list_images()


def test_not_an_archive(pools: tuple[Pool, Pool], tmp_path: Path) -> None:
    _, b = pools
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello" * 1000)
    with pytest.raises(PoolError, match="not a torpor image archive"):
        b.import_image(junk)
    empty_tar = io.BytesIO()
    with tarfile.open(fileobj=empty_tar, mode="w"):
        pass
    empty_tar.seek(0)
    with pytest.raises(PoolError, match="not a torpor image archive"):
        b.import_image(empty_tar)
    with pytest.raises(Exception, match="cannot read archive"):
        b.import_image(tmp_path / "nope")
