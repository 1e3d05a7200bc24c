"""``torpor inspect`` on hostile image directories: symlinks, FIFOs and devices are refused by
name without being followed, what is read is bounded, and no step is quadratic."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from torpor._errors import ImageCorruptedError, ImageError, UnsafeImageError, UnsafePathError
from torpor._images import _inspect
from torpor._images._criu_images import criu_images_pb2 as pb
from torpor._images._inspect import inspect_image

from .test_inspect_decoding import FDINFO, FILES, FILES_ID, MM, PAGE, PAGEMAP, PID, build_image
from .test_inspect_decoding import write as write_entries


@pytest.mark.parametrize("name", ["core-4242.img", "files.img", "pstree.img", "torpor.json"])
def test_a_symlinked_file_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    d = build_image(tmp_path)
    if name == "torpor.json":
        (d / name).write_text("{}")
    real = tmp_path / "elsewhere"
    (d / name).rename(real)
    (d / name).symlink_to(real)
    with pytest.raises(UnsafeImageError) as info:
        inspect_image(d)
    assert info.value.file == name
    assert f"file {name} is a symlink, not a regular file" in str(info.value)


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_an_endless_file_is_refused_at_once(tmp_path: Path, target: str) -> None:
    d = build_image(tmp_path)
    path = d / f"pagemap-{PID}.img"
    path.unlink()
    if target == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(target)
    t0 = time.monotonic()
    with pytest.raises(ImageCorruptedError, match=rf"pagemap-{PID}\.img is a"):
        inspect_image(d)
    assert time.monotonic() - t0 < 2


def test_a_huge_metadata_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    with open(d / "files.img", "r+b") as fh:
        fh.truncate(_inspect.MAX_METADATA + 1)  # sparse: costs nothing to make
    t0 = time.monotonic()
    with pytest.raises(UnsafeImageError, match=r"files\.img has \d+ bytes or more") as info:
        inspect_image(d)
    assert info.value.file == "files.img"
    assert time.monotonic() - t0 < 2


def test_the_metadata_read_in_all_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = build_image(tmp_path)
    monkeypatch.setattr(_inspect, "MAX_TOTAL", 100)
    with pytest.raises(ImageError, match="more than inspect reads"):
        inspect_image(d)


def test_a_symlinked_or_shared_image_directory_is_refused(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(UnsafePathError, match="symlink"):
        inspect_image(tmp_path / "link")
    os.chmod(d, 0o777)
    with pytest.raises(UnsafePathError) as info:
        inspect_image(d)
    assert info.value.hint == f"chmod go-w {d}"


def test_the_size_of_a_page_file_outside_is_not_told(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    before = inspect_image(d).pages_file_bytes
    outside = tmp_path / "big"
    with open(outside, "wb") as fh:
        fh.truncate(1 << 30)
    (d / "pages-2.img").symlink_to(outside)
    assert inspect_image(d).pages_file_bytes == before == 6 * PAGE


def test_many_memory_areas_and_page_runs_cost_no_quadratic_time(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    n = 30_000
    base = 0x7F0000000000
    vmas = [
        pb.VmaEntry(start=base + 2 * i * PAGE, end=base + (2 * i + 1) * PAGE, status=1 | 1 << 9)
        for i in range(n)
    ]
    write_entries(d / f"mm-{PID}.img", MM, pb.MmEntry(vmas=vmas))
    runs = [pb.PagemapEntry(vaddr=base + 2 * i * PAGE, nr_pages=1, flags=4) for i in range(n)]
    write_entries(d / f"pagemap-{PID}.img", PAGEMAP, pb.PagemapHead(pages_id=1), *runs)
    t0 = time.monotonic()
    (task,) = inspect_image(d).tasks
    assert time.monotonic() - t0 < 5  # the pairwise overlap sum took minutes
    assert (task.memory.vmas, task.memory.pages_dumped) == (n, n)
    assert {v.pages_dumped for v in task.vmas} == {1}


def test_many_descriptors_of_many_sockets_cost_no_quadratic_time(tmp_path: Path) -> None:
    d = build_image(tmp_path)
    n = 20_000
    sockets = [
        pb.FileEntry(type=5, id=100 + i, usk=pb.UnixSkEntry(id=100 + i, ino=i, type=1, state=7))
        for i in range(n)
    ]
    write_entries(d / "files.img", FILES, *sockets)
    fds = [pb.FdinfoEntry(id=100 + i, flags=0, type=5, fd=i) for i in range(n)]
    write_entries(d / f"fdinfo-{FILES_ID}.img", FDINFO, *fds)
    t0 = time.monotonic()
    insp = inspect_image(d)
    data = insp.to_dict()
    assert time.monotonic() - t0 < 5  # a scan of every descriptor per socket took minutes
    assert len(data["sockets"]) == n
    assert data["sockets"][123]["holders"] == [[PID, 123]]


def test_overlapping_page_runs_are_counted_once_per_area(tmp_path: Path) -> None:
    # Not something CRIU writes; an image that does is still decoded without error.
    d = build_image(tmp_path)
    base = 0x7F0000000000
    runs = [
        pb.PagemapEntry(vaddr=base + 4 * PAGE, nr_pages=4, flags=4),
        pb.PagemapEntry(vaddr=base + 6 * PAGE, nr_pages=4, flags=4),
    ]
    write_entries(d / f"pagemap-{PID}.img", PAGEMAP, pb.PagemapHead(pages_id=1), *runs)
    (task,) = inspect_image(d).tasks
    assert [v.pages_dumped for v in task.vmas] == [0, 6, 0]
