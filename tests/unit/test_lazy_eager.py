"""Local warm sets (``torpor._lazy._eager``): faults read from a daemon's ``-v4`` log, and the
warm image whose pagemaps make the warm pages eager (offsets kept, encoded as CRIU does)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from torpor._images._criu_images import criu_images_pb2 as pb
from torpor._images._image import Image
from torpor._lazy import _eager
from torpor._lazy._pagemap import PE_LAZY, PE_PRESENT, Extent, parse_pagemap

from .test_lazy_server import ENTRIES, LAZY, PAGE, PID, pagemap_bytes, pages_data
from .test_pool_support import make_image


def _image(tmp_path: Path) -> Image:
    extra = {f"pagemap-{PID}.img": pagemap_bytes(1, ENTRIES)}
    return make_image(tmp_path / "images", "app", pages_data(), extra=extra)


def test_a_pagemap_is_encoded_back_with_the_fields_criu_requires() -> None:
    pm = parse_pagemap(pagemap_bytes(1, ENTRIES), pid=PID, image="x")
    encoded = _eager._encode(pm, pm.extents)
    assert parse_pagemap(encoded, pid=PID, image="x") == pm
    # CRIU's pagemap.proto has vaddr and compat_nr_pages required: without them `criu
    # restore` fails "Failed unpacking object".
    pos, sizes = 8, []
    while pos < len(encoded):
        (size,) = struct.unpack_from("<I", encoded, pos)
        sizes.append(encoded[pos + 4 : pos + 4 + size])
        pos += 4 + size
    for raw in sizes[1:]:
        pe = pb.PagemapEntry.FromString(raw)
        assert pe.HasField("vaddr") and pe.HasField("compat_nr_pages") and pe.HasField("nr_pages")


def test_warm_pages_are_split_out_as_eager_with_their_offsets(tmp_path: Path) -> None:
    image = _image(tmp_path)
    # The first lazy extent is pages 2..5 of the file, the second 6..8; warm: pages 3 and 4
    # (one run in the middle of the first) and 8 (the last of the second).
    warm = [("pages-1.img", 3 * PAGE, 2 * PAGE), ("pages-1.img", 8 * PAGE, PAGE)]
    made = _eager.warm_image(image, warm, tmp_path / "warm")
    assert made is not None
    path, eager = made
    assert eager == 3 * PAGE
    assert os.stat(path).st_mode & 0o777 == 0o700
    pm = parse_pagemap((path / f"pagemap-{PID}.img").read_bytes(), pid=PID, image="x")
    assert pm.extents == (
        Extent(0x10000, 2, PE_PRESENT, 0),
        Extent(0x20000, 1, LAZY, 2 * PAGE),
        Extent(0x21000, 2, PE_PRESENT, 3 * PAGE),
        Extent(0x23000, 1, LAZY, 5 * PAGE),
        Extent(0x40000, 2, LAZY, 6 * PAGE),
        Extent(0x42000, 1, PE_PRESENT, 8 * PAGE),
    )
    assert not pm.extents[2].flags & PE_LAZY
    # Every other file is the image's own, through a symlink (not a copy, not a hard link).
    assert os.readlink(path / "pages-1.img") == str(image.path / "pages-1.img")
    assert sorted(os.listdir(path)) == sorted(os.listdir(image.path))
    assert image.trusted()


def test_no_lazy_warm_page_makes_no_warm_image(tmp_path: Path) -> None:
    image = _image(tmp_path)
    assert _eager.warm_image(image, [("pages-1.img", 0, PAGE)], tmp_path / "w") is None  # eager
    assert not (tmp_path / "w").exists()


def _log(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "lazy-pages.log"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_faults_are_read_in_order_once_within_the_window(tmp_path: Path) -> None:
    pms = {PID: parse_pagemap(pagemap_bytes(1, ENTRIES), pid=PID, image="x")}
    log = _log(
        tmp_path,
        [
            "(00.000100) Version: 4.2.1",
            f"(00.100000) uffd: {PID}-5: #PF at 0x21000",
            f"(00.100100) uffd: {PID}-5: uffd_copy: 0x21000/4096",
            f"(00.200000) uffd: {PID}-5: #PF at 0x40000",
            f"(00.300000) uffd: {PID}-5: #PF at 0x21000",  # again: once
            f"(00.300001) uffd: {PID}-5: #PF at 0x10000",  # an eager page: not a lazy one
            "(00.300002) uffd: 99-5: #PF at 0x21000",  # no such task
            f"(00.300003) uffd: {PID}-5: #PF at 0x21000 trailing",  # not a line CRIU writes
            f"(00.300004) uffd: {PID}-5: #PF at 0x99999000",  # in no extent
            f"(02.100001) uffd: {PID}-5: #PF at 0x41000",  # after the window
        ],
    )
    got = _eager.faults(log, pms, window=2.0, limit=1 << 20)
    assert got == [("pages-1.img", 3 * PAGE, PAGE), ("pages-1.img", 6 * PAGE, PAGE)]
    assert _eager.faults(log, pms, window=2.0, limit=PAGE) == [("pages-1.img", 3 * PAGE, PAGE)]
    assert _eager.faults(tmp_path / "missing.log", pms, window=2.0, limit=PAGE) == []


def test_a_saved_warm_set_is_coalesced_in_order_and_loads_the_same_pages(
    tmp_path: Path, torpor_home: Path
) -> None:
    """One range per faulted page (~5,000 for 20 MiB) cost ~8 ms to check at each load:
    consecutive ranges that continue each other are stored merged, order kept, at most
    ``_warm.MERGED`` bytes each, never across files."""
    from torpor._lazy import _warm

    pages = [("pages-1.img", o * PAGE, PAGE) for o in (3, 4, 5, 9, 10, 2)]
    assert _warm.coalesce(pages) == [
        ("pages-1.img", 3 * PAGE, 3 * PAGE),
        ("pages-1.img", 9 * PAGE, 2 * PAGE),
        ("pages-1.img", 2 * PAGE, PAGE),
    ]
    assert _warm.coalesce([("a", 0, PAGE), ("b", PAGE, PAGE)]) == [
        ("a", 0, PAGE),
        ("b", PAGE, PAGE),
    ]
    run = [("f", i * PAGE, PAGE) for i in range(10)]
    assert _warm.coalesce(run, most=4 * PAGE) == [
        ("f", 0, 4 * PAGE), ("f", 4 * PAGE, 4 * PAGE), ("f", 8 * PAGE, 2 * PAGE),
    ]  # fmt: skip
    image = _image(tmp_path)
    name = next(e.name for e in image.manifest.files if e.name.startswith("pages-"))
    faulted = [(name, o * PAGE, PAGE) for o in (1, 2, 3, 0)]
    _warm.save(image, faulted)
    loaded = _warm.load(image)
    assert loaded == [(name, PAGE, 3 * PAGE), (name, 0, PAGE)]
    with_pages = {(f, o) for f, off, n in loaded for o in range(off, off + n, PAGE)}
    assert with_pages == {(f, o) for f, o, _ in faulted}
