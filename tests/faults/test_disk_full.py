"""Full disks at every stage: a tmpfs as the `-o` destination or as the whole TORPOR_HOME,
filled (by a ballast file) so that a seeded amount of space is left, from none to a little
more than the image needs, while `torpor checkpoint`, `restore`, `image push` and `run` run. After
each the ballast goes and every invariant is checked: the app runs or its image restores,
one-line errors, `torpor ps` true, and the failed command never blocks its retry."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import TIMEOUT, App, Lab, Outcome, iterate
from .invariants import (
    check_output,
    check_ps,
    check_quiet,
    continues,
    restore,
    still_manageable,
    survived,
)
from .test_restore_faults import base_image

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.timeout(TIMEOUT)]

# Fractions of the image's size left free: nothing, a few blocks, partway through the pages,
# around where CRIU's files fit but the manifest would not, and just enough.
STAGES = (0.0, 0.002, 0.3, 0.7, 0.97, 1.0, 1.02, 1.05, 1.1, 1.15, 1.2, 1.3)


@contextlib.contextmanager
def filled(disk: Path, free: int) -> Iterator[None]:
    """Take all but ``free`` bytes of ``disk`` with a ballast file, for the span of the
    block (the ballast goes whatever happens in it)."""
    st = os.statvfs(disk)
    size = max(0, st.f_bavail * st.f_frsize - free)
    ballast = disk / "ballast"
    try:
        with open(ballast, "wb") as fh:
            if size:
                os.posix_fallocate(fh.fileno(), 0, size)
        yield
    finally:
        ballast.unlink(missing_ok=True)


def image_bytes(path: Path) -> int:
    """What an image directory takes on disk."""
    return sum(p.stat().st_blocks * 512 for p in path.iterdir())


def pick_free(rng: random.Random, size: int) -> int:
    """A seeded amount of space to leave: a stage, jittered by up to 8 KiB, or (one time in
    three) within the 16 KiB below the whole image's size, where CRIU's files fit but
    torpor's manifest, signature and stamp may not."""
    if rng.random() < 1 / 3:
        return size - rng.randrange(0, 16384)
    return max(0, int(rng.choice(STAGES) * size) + rng.randrange(-8192, 8192))


def measure(lab: Lab) -> int:
    """The size of a counter app's image on disk (a clean checkpoint, left running)."""
    app = lab.start_app("measure")
    path = Path(lab.ok("checkpoint", "measure", "--leave-running", "--name", "measure").strip())
    size = image_bytes(path)
    lab.cleanup()
    assert app.ref.alive() is False
    return size


def after_full(lab: Lab, out: Outcome) -> None:
    """With the space back: the error rule, nothing stopped, `torpor ps` true."""
    lab.note(f"  {out.story}")
    check_output(lab, out)
    check_quiet(lab, out)
    check_ps(lab, out.story)


def test_checkpoint_onto_a_full_output_disk(
    make_lab: Callable[..., Lab], tmpfs: Callable[[str, int], Path]
) -> None:
    lab = make_lab()
    size = measure(lab)
    disk = tmpfs("disk", 3 * size + (2 << 20))

    def body(i: int, rng: random.Random) -> bool:
        app = lab.start_app(f"a{i}")
        floor = lab.last_count(app.ref.pid)
        leave = i % 2 == 1
        free = pick_free(rng, size)
        dest = disk / f"i{i}"
        lab.note(f"  -o on a disk with {free} bytes free (image ~{size})")
        args = ["checkpoint", app.name, "--name", f"i{i}", "-o", str(dest)]
        with filled(disk, free):
            out = lab.cli(*args, *(["--leave-running"] if leave else []))
        after_full(lab, out)
        held = survived(
            lab, app, out, image=str(dest), committed=dest, floor=floor, leave_running=leave
        )
        lab.note(f"  held: {held}")
        if app.ref.alive():
            retry_same_path(lab, app, dest)
        for entry in list(disk.iterdir()):
            shutil.rmtree(entry)
        return True

    iterate(lab, "disk-full-output", body)


def retry_same_path(lab: Lab, app: App, dest: Path) -> None:
    """A failed checkpoint never blocks its retry: the same -o path works once there is room
    (unless the first attempt made the image there)."""
    if dest.exists():
        return
    out = lab.cli("checkpoint", app.name, "--leave-running", "-o", str(dest))
    check_output(lab, out)
    assert out.rc == 0, lab.fail(f"the retry onto {dest} failed: {out.stderr.strip()}")
    assert (dest / "torpor.json").is_file(), lab.fail(f"the retry made no image at {dest}")


def tidy(lab: Lab, keep: str) -> None:
    """Make room for the next iteration: every local image but ``keep``, the pool's images
    and the pulled copies in the cache go (the test's own files; torpor's stay)."""
    for entry in (lab.home / "images").iterdir():
        if entry.name != keep:
            shutil.rmtree(entry)
    for row in json.loads(lab.ok("images", "--pool", "default", "--json")):
        lab.ok("image", "delete", f"{row['name']}@default")
    cached = lab.home / "cache" / "images"
    if cached.is_dir():
        for entry in cached.iterdir():
            shutil.rmtree(entry)


def test_commands_in_a_full_home(
    make_lab: Callable[..., Lab], tmpfs: Callable[[str, int], Path]
) -> None:
    probe = make_lab()
    size = measure(probe)
    home = tmpfs("fullhome", 6 * size + (8 << 20))
    lab = make_lab(home=home)
    image, floor, ceiling = base_image(lab)

    def body(i: int, rng: random.Random) -> bool:
        op = ("checkpoint", "restore", "leave-running", "push", "run")[i % 5]
        app = lab.start_app(f"a{i}") if op in ("checkpoint", "leave-running") else None
        app_floor = lab.last_count(app.ref.pid) if app is not None else 0
        free = pick_free(rng, size)
        lab.note(f"  {op} in a home with {free} bytes free (image ~{size})")
        with filled(home, free):
            if op == "restore":
                out = lab.cli("restore", image, "--name", f"r{i}", "--json")
            elif op == "push":
                out = lab.cli("image", "push", image, f"p{i}@default")
            elif op == "run":
                out = lab.cli("run", "--name", f"n{i}", "--", *lab.app_argv())
            else:
                assert app is not None
                extra = ["--leave-running"] if op == "leave-running" else []
                out = lab.cli("checkpoint", app.name, "--name", f"i{i}", *extra)
        after_full(lab, out)
        if app is not None:
            held = survived(
                lab,
                app,
                out,
                image=f"i{i}",
                committed=home / "images" / f"i{i}",
                floor=app_floor,
                leave_running=op == "leave-running",
            )
            lab.note(f"  held: {held}")
            if app.ref.alive():
                still_manageable(lab, app, out.story)
        elif op == "restore" and out.rc == 0:
            pids = [int(p["pid"]) for p in json.loads(out.stdout)]
            continues(lab, pids, floor, ceiling, out.story)
        elif op == "run" and out.rc != 0:
            # Refused on the full disk: nothing of it runs, and with room it starts.
            assert not lab.apps(), lab.fail(f"{out.story}: refused, yet {lab.apps()} run")
            lab.start_app(f"n{i}")
        # Whatever failed, the base image is whole and the retry works with room.
        if op == "push":
            retry = lab.cli("image", "push", image, f"p{i}b@default")
            check_output(lab, retry)
            assert retry.rc == 0, lab.fail(f"{out.story}: the push retry failed: {retry.stderr}")
            restore(lab, f"p{i}b@default", f"rp{i}", floor, ceiling, f"{out.story}; the retry")
        else:
            restore(lab, image, f"r{i}x", floor, ceiling, f"{out.story}; the base image")
        tidy(lab, keep=image)
        return True

    iterate(lab, "disk-full-home", body)
