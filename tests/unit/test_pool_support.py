"""Helpers shared by the pool tests (fake CRIU-like images, fast pools), and their own checks."""

from __future__ import annotations

import os
import random
from pathlib import Path

from torpor._images import _manifest
from torpor._images._image import Image, staging
from torpor._pools import MemoryBackend, Pool, Timing
from torpor._pools._backend import Backend

PAGE = 4096
FAST = Timing(heartbeat=0.05, stale=5.0, poll=0.01)


def make_image(
    root: Path,
    name: str,
    pages: bytes,
    *,
    extra: dict[str, bytes] | None = None,
    cmdline: tuple[str, ...] = ("python3", "app.py"),
) -> Image:
    """A committed image directory shaped like CRIU's: a pages file plus small files."""
    files = {
        "pages-1.img": pages,
        "core-1.img": b"core" * 300,
        "mm-1.img": random.Random(len(pages)).randbytes(5000),
        "inventory.img": b"inv",
        "pstree.img": b"pstree",
        **(extra or {}),
    }
    root.mkdir(parents=True, exist_ok=True)
    with staging(root / name) as st:
        for fname, data in files.items():
            (st.path / fname).write_bytes(data)
        return st.commit(
            lambda entries: _manifest.build(
                name=name,
                pid=4242,
                files=entries,
                criu_version="4.2.1",
                cmdline=cmdline,
                rss_bytes=len(pages),
            )
        )


def random_pages(n: int, seed: int = 0, *, zero_every: int = 0) -> bytearray:
    """``n`` pages of random bytes (incompressible), every ``zero_every``-th page zero."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(n * PAGE))
    if zero_every:
        for p in range(0, n, zero_every):
            data[p * PAGE : (p + 1) * PAGE] = bytes(PAGE)
    return data


def touch_pages(data: bytearray, fraction: float, rng: random.Random) -> int:
    """Overwrite ``fraction`` of the pages (scattered) with new random content."""
    n = len(data) // PAGE
    chosen = rng.sample(range(n), max(1, int(n * fraction)))
    for p in chosen:
        data[p * PAGE : (p + 1) * PAGE] = rng.randbytes(PAGE)
    return len(chosen)


def stored_total(backend: Backend) -> int:
    """Bytes of every object in a backend."""
    return sum(backend.size(k) for k in backend.list(""))


def new_mem_pool(name: str = "mem") -> Pool:
    """A pool over a fresh in-memory backend, with fast gc timings."""
    return Pool(name, MemoryBackend(), timing=FAST)


def test_make_image_is_a_verified_image(tmp_path: Path) -> None:
    image = make_image(tmp_path, "x", bytes(random_pages(3)))
    image.verify()
    assert {f.name for f in image.manifest.files} >= {"pages-1.img", "core-1.img"}
    assert os.stat(image.path).st_mode & 0o777 == 0o700


def test_touch_pages_changes_the_asked_fraction() -> None:
    data = random_pages(1000)
    before = bytes(data)
    touched = touch_pages(data, 0.01, random.Random(1))
    changed = sum(
        before[i * PAGE : (i + 1) * PAGE] != data[i * PAGE : (i + 1) * PAGE] for i in range(1000)
    )
    assert touched == 10 and changed == 10
