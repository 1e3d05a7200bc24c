"""The target's disk filling while it copies runs of its base into the new image, in copy mode
against a base both hosts hold, on real CRIU: the migration fails with one line naming b's
disk and ``No space left on device``, the original runs on, unchanged, b keeps nothing of it,
and its base stays intact and trusted: the next migration, once there is room, uses it again
(its chunk ids from the server's cache).

The moment: the target copies a base run from its own base file (``pread``) into the image it
builds, which takes space on its disk as literal bytes do. The space cannot simply be sized to
hold the literal part and not the rest: before the first byte the target checks that the whole
announced image fits (base runs included), and refuses it up front otherwise. So b's images
directory is a tmpfs sized from the images (the base, plus room for the new image and a
margin), and :data:`HOOK`, on b's server, holds the first write of bytes read from the base
(one of ``_dedup_target``'s base buffers, where literal bytes are the channel's ``bytes``)
until :data:`FILLER`, triggered by the file the hook creates, has taken every page left. That
write then meets ``ENOSPC`` from the kernel; the hook only waits and notes the outcome.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SCRIPT, Lab
from .test_migrate_copy import alive, consecutive, counts, paired, ps, server, torpor, wait_for
from .test_migrate_dedup import BLOB, MIB, base_on_both, migrate, restore
from .test_migrate_tcp import addresses, ruleset

pytestmark = pytest.mark.criu
__all__ = ["paired"]

# b's server (a sitecustomize on its PYTHONPATH): the first write of a base run into a memory
# pages file (the bulk of the image) waits for the disk to be full, then goes on; what it met
# is noted in FAULT_MARK.result.
HOOK = """
import os, time
from torpor._migrate import _dedup_target
mark = os.environ["FAULT_MARK"]
pwrite = _dedup_target._pwrite
def _pwrite(fd, data, at):
    from_base = (
        isinstance(data, memoryview) and isinstance(data.obj, bytearray)
        and len(data.obj) == _dedup_target._COPY_BLOCK
    )
    name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    if not from_base or not name.startswith("pages-") or os.path.exists(mark + ".copying"):
        return pwrite(fd, data, at)
    open(mark + ".copying", "x").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(mark + ".full") and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        pwrite(fd, data, at)
    except OSError as exc:
        with open(mark + ".result", "x") as f:
            f.write(f"{exc.strerror}: {len(data)} bytes from the base at {at} of {name}")
        raise
    with open(mark + ".result", "x") as f:
        f.write(f"written: {len(data)} bytes from the base at {at} of {name}")
_dedup_target._pwrite = _pwrite
"""
# On b: once the server copies from its base, takes every page left on the images tmpfs.
FILLER = """
import os, sys, time
images, mark = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 120
while not os.path.exists(mark + ".copying"):
    assert time.monotonic() < deadline, "b copied nothing from its base"
    time.sleep(0.002)
fd = os.open(f"{images}/filler", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
for block in (1 << 20, 4096):  # to the last page
    data = b"x" * block
    try:
        while True:
            os.write(fd, data)
    except OSError as exc:
        assert exc.errno == 28, exc  # ENOSPC
os.close(fd)
st = os.statvfs(images)
open(mark + ".full", "x").close()
print("filled", st.f_bavail * st.f_frsize, flush=True)
"""
USED = "import os, sys; s = os.statvfs(sys.argv[1]); print((s.f_blocks - s.f_bfree) * s.f_frsize)"
STATE = """
import sys
from torpor._images._image import Image
img = Image.open(sys.argv[1])
trusted = img.trusted()
img.verify()
print(trusted, "intact")
"""


def test_target_disk_filling_while_copying_the_base_fails_cleanly(
    paired: Lab,
    tmp_path: Path,
) -> None:
    lab = paired
    images = lab.python("b", "import os; print(os.environ['TORPOR_HOME'] + '/images')")
    made = lab.exec("b", "sh", "-c", f"mkdir -p -m 0700 {images} && mount -t tmpfs -o "
                    f"size=512m,mode=0700 torpor-dedup-fault {images}")  # fmt: skip
    assert made.returncode == 0, made.stderr
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    mark = str(tmp_path / "fault")
    filler: subprocess.Popen[str] | None = None
    try:
        path, base_size = base_on_both(lab, tmp_path, "df-base")
        assert os.path.dirname(path) == images
        # Room for the base, the new image (about the base's size) and a margin: the target's
        # check that the announced image fits passes; the filler then has little to take.
        used = int(lab.python("b", USED, images))
        size = used + base_size + 32 * MIB
        resized = lab.exec("b", "mount", "-o", f"remount,size={size}", images)
        assert resized.returncode == 0, resized.stderr
        pid = restore(lab, path, "df")
        addresses_a, addresses_b = addresses(lab, "a"), addresses(lab, "b")
        filler = subprocess.Popen(
            [sys.executable, str(SCRIPT), "exec", "--dir", str(lab.dir), "b", "--",
             sys.executable, "-c", FILLER, images, mark],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        env = {"PYTHONPATH": str(hook), "FAULT_MARK": mark}
        with server(lab, "b", env) as srv:
            before = counts(lab, "a", "df")
            code, _, err = migrate(lab, "df", srv.where)
            filled = filler.communicate(timeout=90)[0]
            failed = srv.wait_log("torpor-migrate: migration from a failed: ")
            print(err, failed, filled, Path(mark + ".result").read_text())
            # The fault came where it was meant to: a run copied from the base, disk full.
            assert filled.startswith("filled "), filled
            met = Path(mark + ".result").read_text()
            assert re.fullmatch(r"No space left on device: \d+ bytes from the base at \d+ of "
                                r"pages-\d+\.img", met), met  # fmt: skip
            pages = met.rsplit(" ", 1)[1]
            # One line naming b's disk and why; the target read the rest and said so.
            assert code == 1, err
            line = err.strip().splitlines()[-1]
            w = srv.where
            assert line == (
                f"torpor: error: migration of df to {w} failed: {w} could not take it: the disk "
                f"of {w} failed while {pages} was received: {images}: No space left on device "
                f"(the process runs here, unchanged (pid {pid}))"
            ), line
            assert "channel" not in err, err
            # The original runs on: the same process, counting on without a gap.
            rec = ps(lab, "a", "df")
            assert (rec["state"], int(rec["pid"])) == ("running", pid)
            wait_for(lambda: len(counts(lab, "a", "df")) >= len(before) + 10)
            numbers = counts(lab, "a", "df")
            assert numbers[: len(before)] == before and consecutive(numbers)
            assert addresses(lab, "a") == addresses_a and ruleset(lab, "a") == ""
            # b kept nothing: no staging directory, no image, no process, address or table.
            listed = lab.python("b", f"import os; print(sorted(os.listdir({images!r})))")
            assert listed == str(["df-base", "filler"])
            assert ps(lab, "b", "df") == {}
            assert addresses(lab, "b") == addresses_b and ruleset(lab, "b") == ""
            # Its base is intact and still trusted (nothing it holds was at fault).
            assert lab.python("b", STATE, path) == "True intact"
            # With room again, the same server moves it against that base, from its cache.
            gone = lab.exec("b", "rm", f"{images}/filler")
            assert gone.returncode == 0, gone.stderr
            code, summary, err = migrate(lab, "df", srv.where)
            assert code == 0, (err, srv.stop())
            assert summary is not None and int(summary["bytes_from_base"]) >= BLOB  # type: ignore[call-overload]
            cached = srv.wait_log(f"torpor-migrate: base image {path}: ")
            assert " chunk ids cached in " in cached, cached
            srv.wait_log("torpor-migrate: 'df' migrated from a: ")
        assert not alive(pid)
        wait_for(lambda: len(counts(lab, "b", "df")) >= 5)
        assert ps(lab, "b", "df")["state"] == "running"
    finally:
        if filler is not None and filler.poll() is None:
            filler.kill()
            filler.wait()
        torpor(lab, "b", "kill", "df")
        torpor(lab, "a", "kill", "df")
        lab.exec("b", "umount", images)
