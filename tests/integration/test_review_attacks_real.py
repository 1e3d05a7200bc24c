"""Attacks found by the adversarial review of issue 11 (helper R), tried as an unprivileged
user against root's real torpor (and real CRIU where it matters); each is refused.

- The launchers hand a command, with their stdin/stdout/stderr and environment, to whatever
  listens on ``<home>/agent.sock``: before the home is checked. Another user who can create
  that socket (a home that is not private) must not get root's terminal.
- An image directory is verified, then CRIU opens it: whoever can write to a directory on the
  way to it could swap it in between, and root's CRIU would restore (or dump into) theirs.
  The engine refuses such a path, and reads a directory it is given as an fd whatever the path
  names by now.
- The pull cache is keyed by image id, a pool-side field anyone who writes to a pool may set:
  an untrusted host's image given the id of a trusted one must not be restored in its place.
- Issue 11's acceptance on a real image, tried once more through the CLI: a pool record whose
  file name climbs out of the cache (``restore NAME@POOL``), a device or a hard link to a
  root-only file in place of an image file (``restore``): refused in one line naming the file,
  in bounded time, nothing written outside, nothing restored.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from torpor._engine import CriuEngine
from torpor._errors import UnsafePathError
from torpor._images._image import Image
from torpor._process._proc import ProcRef, ref, running

from .helpers import PYTHON, parse_ps, torpor, wait_for

pytestmark = pytest.mark.criu

NOBODY = 65534  # uid and gid (nobody:nogroup)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def arena() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's own are root-only)."""
    base = Path(tempfile.mkdtemp(prefix="torpor-review-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base)


def as_nobody(code: str) -> str:
    """Python source that imports what ``code`` needs (root's interpreter is not readable
    by nobody), drops to nobody, then runs ``code``."""
    return (
        "import json, os, socket, sys, time\n"
        f"os.setgroups([]); os.setresgid({NOBODY}, {NOBODY}, {NOBODY}); "
        f"os.setresuid({NOBODY}, {NOBODY}, {NOBODY})\n" + code
    )


# -- the agent socket ----------------------------------------------------------------------------

FAKE_AGENT = """
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(sys.argv[1])
s.listen(1)
print("listening", flush=True)
s.settimeout(30)
c, _ = s.accept()
try:
    c.send(b"ready")
    data, anc, _, _ = c.recvmsg(1 << 20, socket.CMSG_SPACE(3 * 4))
except OSError:
    data, anc = b"", []
print(f"packet of {len(data)} bytes, {sum(len(a[2]) // 4 for a in anc)} fds", flush=True)
"""


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The native launcher, beside a stand-in torpor-py that says it ran instead."""
    bindir = tmp_path_factory.mktemp("bin")
    exe = bindir / "torpor"
    subprocess.run(
        ["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(ROOT / "bin/torpor.c")],
        check=True,
    )
    stand_in = bindir / "torpor-py"
    stand_in.write_text(f"#!{sys.executable}\nimport sys\nprint('fallback', *sys.argv[1:])\n")
    stand_in.chmod(0o755)
    return exe


@pytest.mark.parametrize("which", ["native", "python"])
def test_a_launcher_never_hands_its_terminal_to_another_users_agent_socket(
    arena: Path, native: Path, which: str
) -> None:
    home = arena / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    fake = subprocess.Popen(
        [PYTHON, "-c", as_nobody(FAKE_AGENT), str(home / "agent.sock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None
        assert fake.stdout.readline() == "listening\n"
        command = [str(native)] if which == "native" else [PYTHON, str(ROOT / "bin/torpor-py")]
        proc = subprocess.run(
            [*command, "ps"],
            capture_output=True,
            text=True,
            env=dict(os.environ, TORPOR_HOME=str(home), SECRET_TOKEN="hunter2"),
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        said, _ = fake.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            fake.kill()
        fake.wait()
    assert said == "packet of 0 bytes, 0 fds\n"  # connected, then left before sending
    if which == "native":
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "fallback ps\n", "")
    else:  # the command ran here, and refused the home
        assert (proc.returncode, proc.stdout) == (1, "")
        assert proc.stderr == (
            f"torpor: error: torpor home {home} is owned by uid {NOBODY}, not by root; "
            f"refused — chown 0 {home}\n"
        )


# -- the way to an image directory ---------------------------------------------------------------

MARKER_APP = """
import os, sys, time
n = 0
while True:
    n += 1
    os.write(1, f"{os.readlink('/proc/self')} {sys.argv[1]} {n}\\n".encode())
    time.sleep(0.05)
"""


def _image_of(home: Path, name: str, marker: str, *where: str) -> str:
    """Checkpoint an app under ``torpor run`` that prints ``marker`` (``where``: checkpoint's
    options saying where to); what the checkpoint printed."""
    env = {"TORPOR_HOME": str(home)}
    app = home / "marker_app.py"
    if not app.exists():
        app.write_text(MARKER_APP)
    out = torpor("run", "--name", name, "--", PYTHON, str(app), marker, **env)
    pid = int(out.stdout.split()[1])
    log = home / "logs" / f"{name}.log"
    wait_for(lambda: log.exists() and marker in log.read_text(), what=f"{name} running")
    made = torpor("checkpoint", name, *where, **env).stdout.strip()
    wait_for(lambda: not running(pid), what=f"{name} stopped")
    return made


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """(home, good, evil): root's image of an app printing GOOD, and an image of one printing
    EVIL that another user has (owned by nobody, as if crafted there)."""
    home = tmp_path_factory.mktemp("review-home")
    store = tmp_path_factory.mktemp("review-images")
    good = Path(_image_of(home, "good", "GOOD", "-o", str(store / "good")))
    evil = Path(_image_of(home, "evil", "EVIL", "-o", str(store / "evil")))
    for path in (evil, *evil.iterdir()):
        os.chown(path, NOBODY, NOBODY)
    yield home, good, evil
    for rec in (home / "procs").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads(rec.read_text())
            proc = ProcRef(data["pid"], data["start_time"])
            if proc.alive():
                os.kill(proc.pid, signal.SIGKILL)


def _their_dir(arena: Path) -> Path:
    """A directory of nobody's, on the way to root's image directories."""
    theirs = arena / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    return theirs


def _swap(theirs: Path) -> None:
    """What nobody does, once root has verified ``theirs/img``: put their image in its place."""
    code = f"os.rename('{theirs}/img', '{theirs}/old'); os.rename('{theirs}/evil', '{theirs}/img')"
    subprocess.run([PYTHON, "-c", as_nobody(code)], check=True, timeout=30)


def test_criu_never_restores_an_image_swapped_in_after_verification(
    images: tuple[Path, Path, Path], arena: Path
) -> None:
    _, good, evil = images
    theirs = _their_dir(arena)
    shutil.copytree(good, theirs / "img")
    shutil.copytree(evil, theirs / "evil")
    for path in (theirs / "evil", *(theirs / "evil").iterdir()):
        os.chown(path, NOBODY, NOBODY)
    image = Image.open(theirs / "img")
    image.verify(full=True)  # root's own image, as it should be
    _swap(theirs)  # the attacker wins the race
    try:
        res = CriuEngine(log_dir=arena).restore(theirs / "img")
    except UnsafePathError as exc:
        refusal = str(exc)
    else:  # root's CRIU ran the attacker's image: stop it, and fail
        _end(res.pid)
        refusal = f"restored pid {res.pid} from {theirs / 'img'}"
    assert refusal == (
        f"image directory {theirs / 'img'} is refused: {theirs} on the way to it is owned by"
        f" uid {NOBODY}, not by root — chown 0 {theirs}"
    )


def test_criu_restores_the_directory_it_is_given_whatever_the_path_names_by_now(
    images: tuple[Path, Path, Path], arena: Path
) -> None:
    _, good, evil = images
    own = arena / "own"  # root's, private: the swap here is root's own doing
    own.mkdir(mode=0o700)
    shutil.copytree(good, own / "img")
    shutil.copytree(evil, own / "other")
    for path in (own / "other", *(own / "other").iterdir()):
        os.chown(path, 0, 0)
    image = Image.open(own / "img")
    with image.opened() as fd:
        os.rename(own / "img", own / "old")
        os.rename(own / "other", own / "img")
        res = CriuEngine(log_dir=arena).restore(own / "img", images_dir_fd=fd)
    try:
        cmdline = Path(f"/proc/{res.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[-2:] == [b"GOOD", b""]
    finally:
        _end(res.pid)


def _end(pid: int) -> None:
    """Kill and reap a process the engine restored as our child."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def test_restore_and_checkpoint_refuse_a_directory_another_user_can_swap(
    images: tuple[Path, Path, Path], arena: Path
) -> None:
    home, good, _ = images
    theirs = _their_dir(arena)
    shutil.copytree(good, theirs / "img")
    env = {"TORPOR_HOME": str(home)}
    res = torpor("restore", str(theirs / "img"), "--name", "victim", check=False, **env)
    if res.returncode == 0:
        torpor("kill", "victim", **env)
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr == (
        f"torpor: error: image directory {theirs / 'img'} is refused: {theirs} on the way to it"
        f" is owned by uid {NOBODY}, not by root — chown 0 {theirs}\n"
    )
    assert "victim" not in parse_ps(torpor("ps", "-a", **env).stdout, "PID")

    out = torpor("run", "--name", "live", "--", PYTHON, str(home / "marker_app.py"), "L", **env)
    pid = int(out.stdout.split()[1])
    try:
        res = torpor("checkpoint", "live", "-o", str(theirs / "out"), check=False, **env)
        assert (res.returncode, res.stdout) == (1, "")
        [line] = res.stderr.splitlines()
        assert line.startswith(f"torpor: error: image directory {theirs}/")
        assert line.endswith(
            f" is refused: {theirs} on the way to it is owned by uid {NOBODY}, not by root"
            f" — chown 0 {theirs}"
        )
        assert sorted(p.name for p in theirs.iterdir()) == ["img"]  # nothing dumped there
        assert running(pid) and ref(pid).alive()  # and the app runs on
    finally:
        torpor("kill", "live", **env)


# -- the pull cache --------------------------------------------------------------------------------


def _set_id(record: Path, new_id: str) -> None:
    """What a writer of a pool can do: change the image id of a record (not signed)."""
    doc = json.loads(zstandard.ZstdDecompressor().decompress(record.read_bytes(), 1 << 24))
    doc["manifest"]["id"] = new_id
    record.write_bytes(zstandard.ZstdCompressor().compress(json.dumps(doc).encode()))


def test_a_signed_pool_never_restores_another_pools_image_from_the_cache(
    tmp_path_factory: pytest.TempPathFactory, torpor_home: Path
) -> None:
    other = tmp_path_factory.mktemp("other-host")  # an untrusted host
    pools = tmp_path_factory.mktemp("pools")
    here, there = {"TORPOR_HOME": str(torpor_home)}, {"TORPOR_HOME": str(other)}
    torpor("pool", "create", "strict", "dir", f"source={pools / 'strict'}", **here)
    torpor("pool", "set", "strict", "security.require_signed=true", **here)
    torpor("pool", "create", "loose", "dir", f"source={pools / 'loose'}", **there)
    _image_of(torpor_home, "good", "GOOD", "--pool", "strict", "--name", "good")
    _image_of(other, "evil", "EVIL", "--pool", "loose", "--name", "evil")
    [good] = json.loads(torpor("images", "--pool", "strict", "--json", **here).stdout)
    _set_id(pools / "loose" / "images+" / "evil", good["id"])
    torpor("pool", "create", "loose", "dir", f"source={pools / 'loose'}", **here)  # adopts it
    torpor("image", "pull", "evil@loose", **here)  # root pulls from the loose pool, once

    pid = int(torpor("restore", "good@strict", "--name", "victim", **here).stdout.split()[1])
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[-2:] == [b"GOOD", b""]
    finally:
        torpor("kill", "victim", **here)


# -- issue 11's acceptance, once more on a real image -------------------------------------------


def _refused(home: Path, *args: str, within: float = 20) -> str:
    """Run ``torpor ARGS`` (a restore); assert it fails in one line within ``within`` seconds
    and that nothing new runs. The line."""
    env = {"TORPOR_HOME": str(home)}
    before = parse_ps(torpor("ps", "-a", **env).stdout, "PID")
    started = time.monotonic()
    res = torpor(*args, check=False, timeout=within, **env)
    assert time.monotonic() - started < within
    after = parse_ps(torpor("ps", "-a", **env).stdout, "PID")
    assert (res.returncode, res.stdout, after) == (1, "", before)
    [line] = res.stderr.splitlines()
    return line


def test_a_pool_record_whose_file_name_climbs_out_is_refused_by_restore(
    images: tuple[Path, Path, Path], arena: Path
) -> None:
    home, good, _ = images
    env = {"TORPOR_HOME": str(home)}
    pool = arena / "pool"
    torpor("pool", "create", "climb", "dir", f"source={pool}", **env)
    torpor("image", "push", str(good), "web@climb", **env)
    record = pool / "images+" / "web"
    doc = json.loads(zstandard.ZstdDecompressor().decompress(record.read_bytes(), 1 << 24))
    escape = "../" * 12 + str(arena / "PWNED").lstrip("/")
    old = doc["files"][0]["name"]
    doc["files"][0]["name"] = escape
    for f in doc["manifest"]["files"]:
        if f["name"] == old:
            f["name"] = escape
    del doc["signature"]  # it no longer covers the manifest; the pool has no policy
    record.write_bytes(zstandard.ZstdCompressor().compress(json.dumps(doc).encode()))
    line = _refused(home, "restore", "web@climb", "--name", "climber")
    assert line == (
        f"torpor: error: image 'web' in pool 'climb': file name {escape!r} is a path, not a"
        " plain name; refused — the image was made or changed by something other than torpor:"
        " do not use it"
    )
    assert not (arena / "PWNED").exists()
    # Nor does the hostile record keep the pool from being deleted.
    assert torpor("pool", "delete", "climb", "--force", **env).returncode == 0


def _copy_of(good: Path, arena: Path) -> tuple[Path, Path]:
    """A private copy of the image and its biggest pages file."""
    copy = arena / "copy"
    os.chmod(arena, 0o700)  # root's own, as images must be reached
    shutil.copytree(good, copy)
    pages = max(copy.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    return copy, pages


def test_a_device_in_place_of_an_image_file_is_refused_at_once(
    images: tuple[Path, Path, Path], arena: Path
) -> None:
    home, good, _ = images
    copy, pages = _copy_of(good, arena)
    pages.unlink()
    os.mknod(pages, 0o600 | 0o020000, os.makedev(1, 5))  # a character device: /dev/zero
    line = _refused(home, "restore", str(copy), "--name", "dev", within=10)
    name = Image.open(good).name
    assert line == (
        f"torpor: error: image {name!r} ({copy}): file {pages.name} is a device, not a regular"
        " file; refused — the image was made or changed by something other than torpor: do not"
        " use it"
    )


def test_a_hard_link_to_a_root_only_file_in_an_image_is_refused(
    images: tuple[Path, Path, Path], arena: Path
) -> None:
    """Root-owned and 0600, so the layout check lets it by; its content is checked."""
    home, good, _ = images
    copy, pages = _copy_of(good, arena)
    secret = arena / "secret"
    secret.write_bytes(os.urandom(pages.stat().st_size))
    os.chmod(secret, 0o600)
    pages.unlink()
    os.link(secret, pages)
    line = _refused(home, "restore", str(copy), "--name", "linked")
    name = Image.open(good).name
    assert line == (
        f"torpor: error: image {name!r} ({copy}) is corrupted: file {pages.name} does not match"
        " its SHA-256 — restore refused; use another image or checkpoint again"
    )
