"""Issue 12 item 5, images part, against real CRIU: ``torpor images`` lists every image torpor
made — ``-o`` paths included, broken ones as broken — ``torpor image delete`` and ``prune``
work on local images, and a self-dump whose seal hits a full disk (a small tmpfs) is listed
as incomplete, refused by restore with the repair hint, repaired, and restores."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._images import _incomplete
from torpor._images._image import Image
from torpor._images._incomplete import RESERVE_NAME
from torpor._process._proc import ProcRef, ref
from torpor._safe import SPARE_PREFIX

from .crashes import fill, leftovers, mount_tmpfs, restores_and_continues, run_counter, used_bytes
from .helpers import LOCAL_IMAGES_COLUMNS, PYTHON, counts, parse_table, torpor, wait_for

pytestmark = pytest.mark.criu

MiB = 1 << 20


def _listed() -> dict[str, tuple[str, str]]:
    """NAME -> (PATH, STATE) of ``torpor images``."""
    rows = parse_table(torpor("images").stdout, LOCAL_IMAGES_COLUMNS)
    return {name: (row["PATH"], row["STATE"]) for name, row in rows.items()}


def test_a_checkpoint_to_a_path_is_listed_restored_and_a_corrupted_one_is_broken(
    torpor_home: Path, tmp_path: Path
) -> None:
    app, log = run_counter(torpor_home, "lc")
    dest = tmp_path / "out" / "img"
    assert torpor("checkpoint", "lc", "-o", str(dest), "--name", "lc-img").stdout == f"{dest}\n"
    image = Image.open(dest)
    m = image.manifest
    rows = parse_table(torpor("images").stdout, LOCAL_IMAGES_COLUMNS)
    assert (
        rows
        == {
            "lc-img": {
                "NAME": "lc-img",
                "ID": m.id[:12],
                "CREATED": m.created[:19],
                "SIZE": rows["lc-img"]["SIZE"],  # human_bytes: checked below
                "PID": str(app.pid),
                "COMMAND": " ".join(m.cmdline)[:50],
                "PATH": str(dest),
                "STATE": "ok",
            }
        }
    )
    assert rows["lc-img"]["SIZE"].endswith(" MiB")
    restores_and_continues(dest, "lc-copy", app, log)
    # A page file cut short: listed as broken, with why, and deletable.
    pages = sorted(p for p in dest.iterdir() if p.name.startswith("pages-"))[0]
    size = pages.stat().st_size
    os.truncate(pages, size - 4096)
    assert _listed() == {
        "lc-img": (
            str(dest),
            f"broken: file {pages.name} has {size - 4096} bytes, expected {size}",
        )
    }
    res = torpor("restore", str(dest), "--name", "no", check=False)
    assert res.returncode == 1
    assert torpor("image", "delete", str(dest)).stderr == f"deleted {dest}\n"
    assert not dest.exists() and _listed() == {}


def test_delete_and_prune_of_local_images(torpor_home: Path, tmp_path: Path) -> None:
    app, _ = run_counter(torpor_home, "pr")
    store = torpor_home / "images"
    made = []
    for dest in (store / "pr-1", store / "pr-2", tmp_path / "pr-3"):
        args = ("checkpoint", "pr", "--leave-running", "--name", dest.name)
        out = torpor(*args, *(("-o", str(dest)) if dest.parent != store else ())).stdout
        assert out == f"{dest}\n"
        made.append(dest)
    other = run_counter(torpor_home, "other", 1)[0]  # another command line: another program
    torpor("checkpoint", "other", "--leave-running", "--name", "other-1")
    assert _listed() == {
        "pr-1": (str(made[0]), "ok"),
        "pr-2": (str(made[1]), "ok"),
        "pr-3": (str(made[2]), "ok"),
        "other-1": (str(store / "other-1"), "ok"),
    }
    # The two older images of the counter go; the other program's one image stays.
    res = torpor("image", "prune", "--keep", "1")
    assert res.stdout == f"deleted {made[1]}\ndeleted {made[0]}\n"
    assert _listed() == {"pr-3": (str(made[2]), "ok"), "other-1": (str(store / "other-1"), "ok")}
    assert torpor("image", "delete", "other-1").stderr == f"deleted {store / 'other-1'}\n"
    assert torpor("image", "delete", str(made[2])).stderr == f"deleted {made[2]}\n"
    assert _listed() == {} and os.listdir(store) == [] and not made[2].exists()
    assert app.alive() and other.alive()
    torpor("kill", "pr")
    torpor("kill", "other")


# -- a self-dump whose seal meets a full disk --------------------------------------------------

APP = textwrap.dedent(
    """
    # A coordinated counter: every 50 ms "<host pid> <count>"; when the trigger file names a
    # directory, it checkpoints itself there (through its keeper), once.
    import os, sys, time
    from pathlib import Path
    import torpor

    trigger = Path(sys.argv[1])
    count = 0
    while True:
        count += 1
        os.write(1, f"{os.readlink('/proc/self')} {count}\\n".encode())
        time.sleep(0.05)
        if trigger.exists():
            mode, dest = trigger.read_text().split(" ", 1)
            trigger.unlink()
            torpor.checkpoint(dest, leave_running=mode == "leave")
    """
)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted for the test (unmounted after it)."""
    path = tmp_path / "disk"
    path.mkdir()
    mount_tmpfs(path, 1024 << 10)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _run_app(home: Path, tmp_path: Path, name: str) -> tuple[ProcRef, Path, Path]:
    script = tmp_path / "app.py"
    script.write_text(APP)
    trigger = tmp_path / "trigger"
    pid = int(
        torpor("run", "--name", name, "--", PYTHON, str(script), str(trigger)).stdout.split()[1]
    )
    log = home / "logs" / f"{name}.log"
    wait_for(lambda: log.exists() and len(counts(log).get(pid, [])) >= 2, what="counting")
    return ref(pid), log, trigger


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _fill_before_the_seal(
    disk: Path, keeper: int, spend_reserve: bool, done: threading.Event, seen: list[str]
) -> None:
    """The moment CRIU has written ``stats-dump`` (the app is gone, the keeper seals next):
    the keeper is held (SIGSTOP) while every free byte is taken (and, if ``spend_reserve``,
    the space reserved for the seal too)."""
    while not done.is_set():
        for name in leftovers(disk):
            staging = disk / name
            if (staging / "stats-dump").exists():
                os.kill(keeper, signal.SIGSTOP)
                try:
                    seen.extend(sorted(os.listdir(staging)))
                    if spend_reserve:
                        os.truncate(staging / RESERVE_NAME, 0)
                        for spare in staging.glob(f"{SPARE_PREFIX}*"):
                            spare.unlink()
                    fill(disk)
                finally:
                    os.kill(keeper, signal.SIGCONT)
                done.set()
                return
        time.sleep(0.0001)


def _self_dump_on_a_disk_that_fills(
    home: Path, tmp_path: Path, disk: Path, *, spend_reserve: bool
) -> tuple[ProcRef, Path, int]:
    """A managed app checkpoints itself to ``disk``, which fills the moment CRIU is done
    (see :func:`_fill_before_the_seal`); the app, its log, its keeper."""
    app, log, trigger = _run_app(home, tmp_path, "sd")
    keeper = _ppid(app.pid)
    # How much the image takes, to size the disk for it and its reserve.
    trigger.write_text(f"leave {disk / 'measure'}")
    wait_for(lambda: (disk / "measure" / "torpor.json").exists(), timeout=30, what="measure")
    need = used_bytes(disk)
    torpor("image", "delete", str(disk / "measure"))
    mount_tmpfs(disk, (need + 4 * MiB) // 1024)

    done = threading.Event()
    seen: list[str] = []
    watcher = threading.Thread(
        target=_fill_before_the_seal, args=(disk, keeper, spend_reserve, done, seen)
    )
    watcher.start()
    try:
        trigger.write_text(f"stop {disk / 'img'}")
        wait_for(lambda: not app.alive(), timeout=30, what="CRIU to end the app")
        wait_for(done.is_set, timeout=30, what="the dump to succeed")
    finally:
        done.set()
        watcher.join()
    assert "torpor.json" not in seen, "the keeper had sealed before it was held"
    return app, log, keeper


def test_a_self_dump_seals_in_its_reserve_on_a_disk_that_filled(
    torpor_home: Path, tmp_path: Path, disk: Path
) -> None:
    app, log, _ = _self_dump_on_a_disk_that_fills(torpor_home, tmp_path, disk, spend_reserve=False)
    wait_for(lambda: (disk / "img").is_dir(), timeout=30, what="the keeper to seal")
    assert _listed() == {"img": (str(disk / "img"), "ok")}
    assert leftovers(disk) == []
    (disk / "filler").unlink()
    restores_and_continues(disk / "img", "sd-copy", app, log)


def test_a_self_dump_whose_seal_meets_a_full_disk_is_listed_repaired_and_restores(
    torpor_home: Path, tmp_path: Path, disk: Path
) -> None:
    app, log, keeper = _self_dump_on_a_disk_that_fills(
        torpor_home, tmp_path, disk, spend_reserve=True
    )
    (staging_name,) = leftovers(disk)
    staging = disk / staging_name
    wait_for(lambda: "incomplete" in torpor("images").stdout, timeout=30, what="the keeper")
    res = torpor("images")
    rows = parse_table(res.stdout, LOCAL_IMAGES_COLUMNS)
    assert {k: (r["PID"], r["PATH"], r["STATE"]) for k, r in rows.items()} == {
        "img": (str(app.pid), str(staging), "incomplete")
    }
    assert res.stderr == (
        f"torpor: warning: image 'img' is incomplete (kept at {staging}): "
        f"`torpor image repair {staging}` finishes it\n"
    )
    keeper_log = (torpor_home / "logs" / "keeper.log").read_text().splitlines()
    # What is free when the keeper words it depends on what the kernel has given back by then
    # (the filler took every byte; the keeper's failed writes may return a few pages).
    line = re.escape(
        f"keeper {keeper}: checkpoint of pid {app.pid} stopped the process but could not "
        f"finish its image: no space left on {disk} (FREE free); the image is kept at "
        f"{staging} — free space on {disk}, then `torpor image repair {staging}` finishes it"
    ).replace("FREE", r"[0-9.]+ (B|KiB)")
    assert re.fullmatch(r"\S+ " + line, keeper_log[-1]), keeper_log[-1]
    res = torpor("restore", str(disk / "img"), check=False)
    assert (res.returncode, res.stderr) == (
        1,
        f"torpor: error: image '{disk / 'img'}' is incomplete: its checkpoint could not finish "
        f"it (kept at {staging}) — `torpor image repair {disk / 'img'}` finishes it\n",
    )
    (disk / "filler").unlink()
    assert torpor("image", "repair", str(disk / "img")).stdout == f"{disk / 'img'}\n"
    assert _listed() == {"img": (str(disk / "img"), "ok")}
    restores_and_continues(disk / "img", "sd-copy", app, log)


def test_a_process_in_a_time_namespace_records_its_start_time_as_the_host_sees_it() -> None:
    """A self-dump through a detached finaliser says its staging directory is in use while
    the dumped process lives, by its start time; a restored process runs in a time namespace
    (CRIU's timens), whose boot-time offset changes what it reads for itself."""
    probe = (
        "import os, sys, time\n"
        "from torpor._process._finalize import host_start_time\n"
        "raw = open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19]\n"
        "print(os.getpid(), raw, host_start_time(), flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        ["unshare", "--time", "--boottime", "1000", "--fork", PYTHON, "-c", probe],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        pid, raw, reckoned = (int(v) for v in proc.stdout.readline().split())
        host = ref(pid).start_time
        assert int(raw) - host == 1000 * os.sysconf("SC_CLK_TCK")  # the namespace's view
        assert abs(reckoned - host) <= 1
        assert _incomplete._alive(pid, reckoned)
    finally:
        proc.kill()
        proc.wait()


def test_a_self_dump_of_a_process_torpor_did_not_start_is_listed(
    torpor_home: Path, tmp_path: Path
) -> None:
    """Through the detached finaliser: its index entry is written before the dump, and its
    record and reserve are gone from the finished image."""
    app = tmp_path / "app.py"
    app.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from torpor._process._selfdump import self_checkpoint\n"
        "self_checkpoint(Path(sys.argv[1]), leave_running=True, name='loose')\n"
        "time.sleep(60)\n"
    )
    dest = tmp_path / "out" / "img"
    dest.parent.mkdir()
    proc = subprocess.Popen(
        [PYTHON, str(app), str(dest)], stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for(lambda: (dest / "torpor.json").exists(), timeout=30, what="the image")
        wait_for(lambda: leftovers(dest.parent) == [], what="the finaliser")
        assert _listed() == {"loose": (str(dest), "ok")}
        assert sorted(n for n in os.listdir(dest) if n.startswith(".torpor-tmp-")) == []
    finally:
        proc.kill()
        proc.wait()
