"""``torpor migrate --mode copy`` against a base both hosts hold, on real CRIU: a process restored
from an image that the target holds too moves with far fewer bytes than its image, its state
going on; a base damaged on the target without a trace (bit rot under a stamp that still vouches
for it) fails the migration, the original running on unchanged, and the next migration verifies
the base in full, finds it damaged and sends everything.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from .conftest import Lab
from .test_migrate_copy import (
    alive,
    consecutive,
    counts,
    images,
    paired,  # noqa: F401  (the fixture)
    ps,
    server,
    torpor,
    wait_for,
)

pytestmark = pytest.mark.criu

MIB = 1 << 20
BLOB = 48 * MIB
# 48 MiB of memory that does not change (the base's pages), then 0, 1, 2, ... every 20 ms.
APP = (
    "import os, time\n"
    f"blob = os.urandom({BLOB})\n"
    "i = 0\n"
    "while True:\n"
    "    print(i, flush=True)\n"
    "    i += 1\n"
    "    time.sleep(0.02)\n"
)
# On a host: flip one byte in the middle of an image's largest pages file and let its stamp
# vouch for the file again (as bit rot would leave it: no timestamp says it changed).
ROT = """
import os, sys
from torpor._images._image import Image, write_stamp
img = Image.open(sys.argv[1])
pages = max((f for f in img.manifest.files if f.name.startswith("pages-")), key=lambda f: f.size)
with open(os.path.join(sys.argv[1], pages.name), "r+b") as f:
    f.seek(pages.size // 2)
    b = f.read(1)
    f.seek(pages.size // 2)
    f.write(bytes([b[0] ^ 0xFF]))
with img.opened() as fd:
    stats = {e.name: os.stat(e.name, dir_fd=fd, follow_symlinks=False) for e in img.manifest.files}
    write_stamp(fd, img.manifest, stats)
print(pages.name)
"""


def base_on_both(lab: Lab, tmp: Path, name: str) -> tuple[str, int]:
    """Run :data:`APP` on a, checkpoint it into the image ``name``, and copy that image to b's
    images directory (out of band, as an admin or a pool would); its path (the same on both
    hosts) and size."""
    started = torpor(lab, "a", "run", "--name", name, "--", sys.executable, "-c", APP)
    assert started.returncode == 0, started.stderr
    wait_for(lambda: len(counts(lab, "a", name)) >= 5, timeout=30)
    done = torpor(lab, "a", "checkpoint", name, "--name", name, "--json")
    assert done.returncode == 0, done.stderr
    path = json.loads(done.stdout)["image"]
    assert path.startswith(lab.node("a")["home"])
    shared = tmp / name
    lab.python("b", "from torpor import _paths; _paths.images_dir()")  # made 0700 as torpor does
    for host, src, dst in (("a", path, str(shared)), ("b", str(shared), path)):
        res = lab.exec(host, "cp", "-a", src, dst)
        assert res.returncode == 0, res.stderr
    size = int(
        lab.python("a", f"import os; print(sum(e.stat().st_size for e in os.scandir({path!r})))")
    )
    return path, size


def restore(lab: Lab, path: str, name: str) -> int:
    """Restore the image at ``path`` on a as ``name``; its pid once it counts."""
    res = torpor(lab, "a", "restore", path, "--name", name)
    assert res.returncode == 0, res.stderr
    rec = ps(lab, "a", name)
    assert rec["restored_from"] == path
    before = len(counts(lab, "a", name))
    wait_for(lambda: len(counts(lab, "a", name)) >= before + 3)
    return int(rec["pid"])


def migrate(lab: Lab, name: str, where: str) -> tuple[int, dict[str, object] | None, str]:
    res = torpor(lab, "a", "migrate", name, "--to", where, "--mode", "copy", "--json")
    return res.returncode, json.loads(res.stdout) if res.returncode == 0 else None, res.stderr


def test_a_process_restored_from_a_base_both_hold_sends_only_what_b_lacks(
    paired: Lab,  # noqa: F811
    tmp_path: Path,
) -> None:
    lab = paired
    path, base_size = base_on_both(lab, tmp_path, "dd-base")
    pid = restore(lab, path, "dd")
    with server(lab, "b") as srv:
        code, summary, err = migrate(lab, "dd", srv.where)
        assert code == 0, (err, srv.stop())
        assert summary is not None
        got = srv.wait_log("torpor-migrate: received 'dd' from a: ")
        srv.wait_log("torpor-migrate: 'dd' migrated from a: ")
    image_bytes = int(summary["bytes"])  # type: ignore[call-overload]
    sent, from_base = int(summary["bytes_sent"]), int(summary["bytes_from_base"])  # type: ignore[call-overload]
    assert image_bytes > BLOB and base_size > BLOB
    # The 48 MiB that did not change came from b's copy of the base; what crossed is the rest.
    assert from_base >= BLOB, summary
    assert sent <= image_bytes // 8, summary
    assert f"({sent} sent, {from_base} copied from the base image {path}, " in got
    # The state goes on there: the count continues from where a stopped.
    before = counts(lab, "a", "dd")
    wait_for(lambda: len(counts(lab, "b", "dd")) >= 10)
    after = counts(lab, "b", "dd")
    assert after[0] == before[-1] + 1 and consecutive(after)
    assert not alive(pid)
    assert ps(lab, "b", "dd")["state"] == "running"
    assert images(lab, "b") == str(["dd-base"])  # the base stays; the image in transit went
    assert torpor(lab, "b", "kill", "dd").returncode == 0


def test_a_base_rotten_on_b_fails_the_migration_and_the_original_runs_on(
    paired: Lab,  # noqa: F811
    tmp_path: Path,
) -> None:
    lab = paired
    path, _ = base_on_both(lab, tmp_path, "rot-base")
    first = restore(lab, path, "rot1")
    second = restore(lab, path, "rot2")
    with server(lab, "b") as srv:
        # The first builds b's cache of the base's chunk ids, from the base intact.
        code, summary, err = migrate(lab, "rot1", srv.where)
        assert code == 0, (err, srv.stop())
        assert summary is not None and int(summary["bytes_from_base"]) >= BLOB  # type: ignore[call-overload]
        srv.wait_log("torpor-migrate: 'rot1' migrated from a: ")
        # Then one byte of b's base rots; its stamp still vouches for it.
        pages = lab.python("b", ROT, path)
        frozen_before = counts(lab, "a", "rot2")
        code, _, err = migrate(lab, "rot2", srv.where)
        assert code == 1
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"torpor: error: migration of rot2 to {srv.where} failed: ")
        assert f"arrived damaged: {pages} did not match the source's SHA-256 (" in line
        # Named, not located: the target's paths are not the source's business.
        assert re.search(
            r" bytes were copied from the base image 'rot-base' \(content id [0-9a-f]{16}\) "
            r"here, which may be damaged: ",
            line,
        ), line
        assert str(path) not in line
        assert line.endswith(f"(the process runs here, unchanged (pid {second}))")
        # The original runs on, the same process, counting on without a gap.
        rec = ps(lab, "a", "rot2")
        assert (rec["state"], int(rec["pid"])) == ("running", second)
        wait_for(lambda: len(counts(lab, "a", "rot2")) >= len(frozen_before) + 10)
        numbers = counts(lab, "a", "rot2")
        assert numbers[: len(frozen_before)] == frozen_before and consecutive(numbers)
        assert ps(lab, "b", "rot2") == {}
        # Next time b verifies its base in full, finds it damaged, and takes everything sent.
        code, summary, err = migrate(lab, "rot2", srv.where)
        assert code == 0, (err, srv.stop())
        assert summary is not None
        assert (summary["bytes_sent"], summary["bytes_from_base"]) == (summary["bytes"], 0)
        refused = srv.wait_log(f"torpor-migrate: base image {path} not used: ")
        assert f"file {pages} does not match its SHA-256" in refused
        srv.wait_log("torpor-migrate: 'rot2' migrated from a: ")
    assert not alive(first) and not alive(second)
    wait_for(lambda: len(counts(lab, "b", "rot2")) >= 5)
    assert consecutive(counts(lab, "b", "rot2"))
    for name in ("rot1", "rot2"):
        assert torpor(lab, "b", "kill", name).returncode == 0
