"""Issue 10 points 2 and 4 on real CRIU: ``torpor restore NAME@POOL --lazy`` from the ``default``
dir pool, nothing of the image local beforehand.

A 256 MiB app (``apps/lazy_ballast.py``: random bytes, never zeros) is checkpointed into the
pool and every local copy removed, then:

- restored ``--lazy``: at resume only the small files and the non-lazy pages are local (the
  pages file's allocated blocks are a small part of its size), it answers with the original's
  answer, becomes fully resident, and the checksum of all its memory matches the original's;
  the local part is removed once resident, and the warm set is stored in the pool;
- a byte flipped in one stored pack chunk holding lazy pages: the copy never runs on it (it
  never answers the checksum, which touches every page): it is SIGKILLed, its record ends with
  signal 9 and its lazy state names the image, the file and the chunk.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from torpor._lazy import _poolimage
from torpor._lazy import _restore as lazy
from torpor._pools import open_pool
from torpor._pools._pack import PackIndex, pack_key
from torpor._process import _registry
from torpor._process._proc import running

from .helpers import APPS, PYTHON, copy_log, torpor, wait_for

pytestmark = pytest.mark.criu

MIB = 256


@pytest.fixture(autouse=True)
def _pipe_max_size() -> None:
    """CRIU's lazy page transfer splices through pipes of up to 4 MiB (see CRIU notes)."""
    path = Path("/proc/sys/fs/pipe-max-size")
    if int(path.read_text()) < 4 << 20:
        subprocess.run(["sysctl", "-q", "-w", "fs.pipe-max-size=4194304"], check=True)


def _lines(log: Path, kind: str) -> dict[str, str]:
    out = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        parts = line.split()
        if len(parts) == 3 and parts[0] == kind:
            out[parts[1]] = parts[2]
    return out


def _ask(trig: Path, log: Path, kind: str, tag: str, timeout: float = 60) -> str:
    (trig / f"{kind}-{tag}").touch()
    word = "answer" if kind == "ask" else "sum"
    got = wait_for(lambda: _lines(log, word).get(tag), timeout=timeout, what=f"{kind} {tag}")
    assert isinstance(got, str)
    return got


def _pooled(home: Path, tmp_path: Path, name: str) -> tuple[Path, str, str]:
    """Run the app, read its answer and checksum, checkpoint it into the default pool, remove
    every local copy: (trigger dir, answer, sum)."""
    trig = tmp_path / f"trig-{name}"
    trig.mkdir()
    torpor("run", "--name", name, "--", PYTHON, str(APPS / "lazy_ballast.py"), str(trig), str(MIB))
    log = home / "logs" / f"{name}.log"
    wait_for(lambda: log.exists() and "ready" in log.read_text(), timeout=30, what="ready")
    answer = _ask(trig, log, "ask", "orig")
    total = _ask(trig, log, "sum", "orig")
    torpor("checkpoint", name, "--name", f"{name}-img", "--pool", "default")
    for local in (home / "images", home / "cache"):
        shutil.rmtree(local, ignore_errors=True)
    assert not (home / "images" / f"{name}-img").exists()
    return trig, answer, total


def _restore_lazy(image: str) -> list[dict[str, object]]:
    rows = json.loads(torpor("restore", image, "--lazy", "--json").stdout)
    assert isinstance(rows, list)
    return rows


def _pages_file(image: str) -> tuple[str, int]:
    with open_pool("default") as pool:
        rec = pool._record(image)
    pages = [f for f in rec.files if f.name.startswith("pages-")]
    big = max(pages, key=lambda f: f.size)
    return big.name, big.size


def test_lazy_restore_from_a_pool_resumes_with_little_local_then_is_whole(
    torpor_home: Path, tmp_path: Path
) -> None:
    trig, answer, total = _pooled(torpor_home, tmp_path, "pl")
    pages, size = _pages_file("pl-img")
    assert size > MIB << 20
    started = time.monotonic()
    (row,) = _restore_lazy("pl-img@default")
    assert set(row) == {
        "name", "pid", "resume_s", "resident_s", "memory", "error", "local_bytes", "image_bytes",
    }  # fmt: skip
    assert row["name"] == "pl-img" and row["error"] is None
    assert isinstance(row["resume_s"], float) and 0 < row["resume_s"] < 20
    # At resume: only the small files and the non-lazy pages were local.
    local, whole = row["local_bytes"], row["image_bytes"]
    assert isinstance(local, int) and isinstance(whole, int) and whole > size
    assert local < whole // 16, (local, whole)
    st = lazy.read_state("pl-img")
    assert st is not None and st.daemon_pid is not None and st.pid == row["pid"]
    log = copy_log(torpor_home, "pl-img")
    assert _ask(trig, log, "ask", "lazy") == answer
    first_answer = time.monotonic() - started
    final = lazy.wait_states(["pl-img"], timeout=120)["pl-img"]
    assert final.state == "resident", final
    assert not running(st.daemon_pid)
    assert _ask(trig, log, "sum", "lazy") == total
    assert _registry.load("pl-img").ended is None
    # Its local part went once resident; the warm set is in the pool, for this record.
    parts = torpor_home / "cache" / _poolimage.LAZY_POOL_DIR
    wait_for(lambda: list(parts.iterdir()) == [], what="the local part removed")
    with open_pool("default") as pool:
        warm = json.loads(pool.backend.get(_poolimage.warm_key("pl-img")))
        rec = pool._record("pl-img")
    assert warm["image"] == rec.manifest.id
    assert len(warm["ranges"]) > 0 and {r[0] for r in warm["ranges"]} == {pages}
    print(f"lazy from pool: resume {row['resume_s']:.3f}s, first answer {first_answer:.3f}s")


def _flip_lazy_chunk(image: str) -> tuple[str, int, bytes]:
    """Flip a byte of the stored chunk in the middle of the image's biggest pages file (the
    ballast: lazy memory), in a frame holding only the ballast's chunks: (file, index, digest)."""
    with open_pool("default") as pool:
        rec = pool._record(image)
        lists = dict(zip((f.name for f in rec.files), pool._resolve(rec), strict=True))
        name, size = _pages_file(image)
        digests = lists[name]
        i = size // 4096 // 2
        want = digests[i]
        near = set(digests[i - 256 : i + 256])
        for key in list(pool.backend.list("index/")):
            index = PackIndex.decode(key.split("/", 1)[1], pool.backend.get(key))
            for c in index.chunks:
                if c.digest != want:
                    continue
                frame = index.frames[c.frame]
                assert frame.codec == 0  # random pages are stored raw
                assert {x.digest for x in index.chunks if x.frame == c.frame} <= near
                data = bytearray(pool.backend.get(pack_key(index.pack_id)))
                data[frame.offset + c.offset + 100] ^= 0x01
                pool.backend.put(pack_key(index.pack_id), bytes(data))
                return name, i, want
    raise AssertionError("chunk not found")


def test_a_flipped_lazy_chunk_in_the_pool_kills_the_copy_and_names_it(
    torpor_home: Path, tmp_path: Path
) -> None:
    trig, _, _ = _pooled(torpor_home, tmp_path, "pf")
    file, index, digest = _flip_lazy_chunk("pf-img")
    (row,) = _restore_lazy("pf-img@default")
    pid = row["pid"]
    assert isinstance(pid, int)
    log = copy_log(torpor_home, "pf-img")
    (trig / "sum-bad").touch()  # touches every page: never answered on a bad one
    final = lazy.wait_states(["pf-img"], timeout=120)["pf-img"]
    assert final.state == "failed", final
    assert final.error is not None
    assert final.error.startswith(
        f"image 'pf-img' in pool 'default': file {file}, chunk {index} (sha256 {digest.hex()}) "
        "in pack "
    ), final.error
    assert "does not match its SHA-256" in final.error
    assert final.error.endswith(f"copy pf-img (pid {pid}) was killed"), final.error
    rec = wait_for(
        lambda: (r := _registry.load("pf-img")).ended is not None and r, what="the record ended"
    )
    assert isinstance(rec, _registry.ManagedProcess)
    assert rec.exit_status == -9
    assert not running(pid)
    assert "bad" not in _lines(log, "sum")


def test_the_pools_warm_set_is_restored_before_the_resume(
    torpor_home: Path, tmp_path: Path
) -> None:
    """The warm set the first lazy restore stored in the pool: the next one (nothing local
    again) fetches its chunks, verified, with the local part and restores them eagerly from
    a warm image; the copy is right."""
    trig, answer, total = _pooled(torpor_home, tmp_path, "pw")
    rows = json.loads(
        torpor("restore", "pw-img@default", "--lazy", "--json", "--name", "pw1").stdout
    )
    assert rows[0]["name"] == "pw1"
    log = copy_log(torpor_home, "pw1")
    assert _ask(trig, log, "ask", "pw1") == answer
    assert lazy.wait_states(["pw1"], timeout=120)["pw1"].state == "resident"

    def stored() -> list[list[object]] | None:  # written just after the resident state
        with open_pool("default") as pool:
            try:
                ranges: list[list[object]] = json.loads(
                    pool.backend.get(_poolimage.warm_key("pw-img"))
                )["ranges"]
            except KeyError:
                return None
            return ranges

    warm = wait_for(stored, what="the warm set in the pool")
    assert isinstance(warm, list)
    torpor("stop", "pw1")
    shutil.rmtree(torpor_home / "cache", ignore_errors=True)
    rows = json.loads(
        torpor("restore", "pw-img@default", "--lazy", "--json", "--name", "pw2").stdout
    )
    st = lazy.read_state("pw2")
    assert st is not None and st.warm_bytes == sum(r[2] for r in warm) > 0, (st, len(warm))
    log = copy_log(torpor_home, "pw2")
    assert _ask(trig, log, "ask", "pw2") == answer
    assert lazy.wait_states(["pw2"], timeout=120)["pw2"].state == "resident"
    assert _ask(trig, log, "sum", "pw2") == total
