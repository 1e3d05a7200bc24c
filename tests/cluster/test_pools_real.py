"""Pools on a real Ceph cluster (RADOS and RGW's S3), with real CRIU images.

A small Python process (its own session, stdio on /dev/null, no inherited fds) is dumped with
``criu dump --leave-running`` twice; the images go through ``ceph`` and ``s3`` pools and come
back byte for byte; a byte flipped in a stored pack is refused, naming the image and the file.

The backend conformance suite is not run against the pool stack: a pool is not a keyed-blob
store but a user of one (the drivers run it in test_backend_ceph.py / test_backend_s3.py).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor._errors import ImageCorruptedError
from torpor._images import _manifest
from torpor._images._image import Image, staging
from torpor._images._layout import is_bookkeeping
from torpor._pools import Pool, create_pool, delete_pool, open_pool
from torpor._pools._pack import PackIndex, index_key, pack_key
from torpor._process._proc import facts

pytestmark = [pytest.mark.ceph, pytest.mark.criu]

# Touches a few pages of a 32 MiB working set ten times a second, so two dumps differ a bit.
APP = """
import os, random, time
data = bytearray(os.urandom(32 << 20))
rng = random.Random(1)
while True:
    for _ in range(8):
        p = rng.randrange(len(data) // 4096) * 4096
        data[p:p + 16] = os.urandom(16)
    time.sleep(0.1)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def criu_dump(pid: int, dest: Path, work: Path) -> Image:
    """``criu dump --leave-running`` of ``pid`` into a committed image directory ``dest``."""
    work.mkdir(parents=True, exist_ok=True)
    with staging(dest) as st:
        res = subprocess.run(
            ["criu", "dump", "-t", str(pid), "-D", str(st.path), "-W", str(work),
             "--leave-running", "-o", "dump.log", "-v4"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert res.returncode == 0, (work / "dump.log").read_text()[-3000:]
        cmdline, rss = facts(pid)
        return st.commit(
            lambda entries: _manifest.build(
                name=dest.name, pid=pid, files=entries, criu_version="4.2.1",
                cmdline=cmdline, rss_bytes=rss,
            )
        )  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Image, Image]]:
    """Two dumps of the same running process, a moment apart."""
    root = tmp_path_factory.mktemp("criu-images")
    proc = subprocess.Popen(
        [sys.executable, "-c", APP],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        first = criu_dump(proc.pid, root / "first", root / "work1")
        time.sleep(0.5)
        second = criu_dump(proc.pid, root / "second", root / "work2")
        yield first, second
    finally:
        _kill(proc.pid)
        proc.wait(timeout=5)


@pytest.fixture(params=["ceph", "s3"])
def pool(
    request: pytest.FixtureRequest, ceph_cluster: dict[str, Any], torpor_home: Path
) -> Iterator[Pool]:
    """A fresh pool of each driver on the session's cluster, deleted with its data after."""
    tag = uuid.uuid4().hex[:8]
    if request.param == "ceph":
        request.getfixturevalue("rados_module")
        config = {
            "ceph.conf": ceph_cluster["conf"],
            "ceph.user.name": ceph_cluster["rados_user"],
            "ceph.osd.pool_name": f"torpor-pools-{tag}",
            "ceph.osd.pg_num": "8",
        }
    else:
        request.getfixturevalue("boto3_module")
        config = {
            "s3.bucket": f"torpor-pools-{tag}",
            "s3.endpoint": ceph_cluster["s3_endpoint"],
            "s3.region": "us-east-1",
            "s3.access_key": ceph_cluster["s3_access_key"],
            "s3.secret_key": ceph_cluster["s3_secret_key"],
        }
    name = f"{request.param}-{tag}"
    create_pool(name, request.param, config)
    p = open_pool(name)
    yield p
    p.close()
    delete_pool(name, force=True)


def _content_files(image_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(image_dir) if not is_bookkeeping(n))


def _same_files(a: Path, b: Path) -> None:
    # The image's content; torpor's bookkeeping (verification stamp, CRIU's log) is local.
    names = _content_files(a)
    assert names == _content_files(b)
    assert {"inventory.img", "pstree.img"} <= set(names), names  # a CRIU image, not nothing
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_push_pull_real_images(pool: Pool, images: tuple[Image, Image]) -> None:
    first, second = images
    one = pool.push(first, "app-1")
    two = pool.push(second, "app-2")
    total = first.manifest.total_bytes
    assert one.stored_bytes < total * 1.05
    # the second dump changed a few pages only: it costs a small fraction of the first
    assert two.stored_bytes < 0.1 * one.stored_bytes, (one, two)
    for name, local in (("app-1", first), ("app-2", second)):
        pulled = pool.pull(name)
        pulled.verify()
        _same_files(pulled.path, local.path)
        assert pulled.manifest.name == name and pulled.manifest.pid == local.manifest.pid
    assert [i.name for i in pool.list_images()] == ["app-1", "app-2"]
    pool.delete_image("app-1")
    stats = pool.gc()
    assert stats.images == 1 and stats.missing_chunks == 0
    _same_files(pool.pull("app-2").path, second.path)


def test_a_flipped_byte_in_a_stored_pack_is_refused(
    pool: Pool, images: tuple[Image, Image]
) -> None:
    first, _ = images
    pool.push(first, "victim")
    pages = next(f for f in first.manifest.files if f.name.startswith("pages-"))
    with open(first.path / pages.name, "rb") as fh:
        fh.seek(pages.size // 2 // 4096 * 4096)
        page = fh.read(4096)
    digest = hashlib.sha256(page).digest()
    for key in pool.backend.list("index/"):
        pack_id = key.rsplit("/", 1)[-1]
        idx = PackIndex.decode(pack_id, pool.backend.get(index_key(pack_id)))
        entry = next((c for c in idx.chunks if c.digest == digest), None)
        if entry is not None:
            break
    else:
        pytest.fail("the page is in no pack")
    data = bytearray(pool.backend.get(pack_key(pack_id)))
    frame = idx.frames[entry.frame]
    spot = frame.offset + (entry.offset + 100 if frame.codec == 0 else frame.stored // 2)
    data[spot] ^= 0x5A
    pool.backend.put(pack_key(pack_id), bytes(data))
    with pytest.raises(ImageCorruptedError) as info:
        pool.pull("victim")
    err = info.value
    assert "'victim'" in str(err)
    assert err.file in {f.name for f in first.manifest.files}
    assert err.file in str(err)


def test_copy_between_ceph_and_s3_moves_only_missing_chunks(
    ceph_cluster: dict[str, Any],
    torpor_home: Path,
    images: tuple[Image, Image],
    rados_module: Any,
    boto3_module: Any,
) -> None:
    first, second = images
    tag = uuid.uuid4().hex[:8]
    create_pool(
        "c", "ceph",
        {"ceph.conf": ceph_cluster["conf"], "ceph.user.name": ceph_cluster["rados_user"],
         "ceph.osd.pool_name": f"torpor-copy-{tag}", "ceph.osd.pg_num": "8"},
    )  # fmt: skip
    create_pool(
        "s", "s3",
        {"s3.bucket": f"torpor-copy-{tag}", "s3.endpoint": ceph_cluster["s3_endpoint"],
         "s3.region": "us-east-1", "s3.access_key": ceph_cluster["s3_access_key"],
         "s3.secret_key": ceph_cluster["s3_secret_key"]},
    )  # fmt: skip
    try:
        with open_pool("c") as ceph, open_pool("s") as s3:
            ceph.push(first, "a")
            ceph.push(second, "b")
            full = ceph.copy_image("a", "a", to_pool=s3)
            delta = ceph.copy_image("b", "b", to_pool=s3)
            assert delta.stored_bytes < 0.1 * full.stored_bytes
            _same_files(s3.pull("b").path, second.path)
    finally:
        delete_pool("c", force=True)
        delete_pool("s", force=True)
