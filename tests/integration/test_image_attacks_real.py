"""A real CRIU image, tampered with as an attacker would, is refused by ``torpor restore``:
naming the file, in one line, in bounded time, with nothing restored (issue 11's acceptance)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor._process._proc import ProcRef

from .helpers import APPS, PYTHON, counts, torpor, wait_for

pytestmark = pytest.mark.criu


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One torpor home for the module (one real dump serves every attack); every process
    recorded in it is killed, by pid and start time, at the end."""
    home = tmp_path_factory.mktemp("attacks-home")
    yield home
    refs = []
    for rec in (home / "procs").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads(rec.read_text())
            refs.append(ProcRef(data["pid"], data["start_time"]))
    for ref in refs:
        if ref.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(ref.pid, signal.SIGKILL)


def cli(
    home: Path, *args: str, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return torpor(*args, check=check, timeout=timeout, TORPOR_HOME=str(home))


@pytest.fixture(scope="module")
def pristine(home: Path) -> Path:
    """A real image of the counter app (the app is stopped by the checkpoint)."""
    out = cli(home, "run", "--name", "count", "--", PYTHON, str(APPS / "counter.py")).stdout
    pid = int(out.split()[1])
    log = home / "logs" / "count.log"
    wait_for(lambda: log.exists() and len(counts(log).get(pid, [])) >= 3, what="counting")
    image = Path(cli(home, "checkpoint", "count", "--name", "pristine").stdout.strip())
    return image


@pytest.fixture
def copy(pristine: Path, request: pytest.FixtureRequest) -> Path:
    """A private copy of the pristine image to attack."""
    dest = pristine.parent / f"attack-{request.node.name.split('[')[-1].rstrip(']')}"
    shutil.copytree(pristine, dest, symlinks=True)
    return dest


def biggest_pages(image: Path) -> Path:
    return max(image.glob("pages-*.img"), key=lambda p: p.stat().st_size)


def refused(home: Path, image: Path, *, within: float = 20) -> str:
    """Restore ``image``; assert it is refused in one line, within ``within`` seconds, and
    that nothing was restored. The error line."""
    before = sorted(p.name for p in (home / "procs").glob("*.json"))
    t0 = time.monotonic()
    res = cli(home, "restore", str(image), "--name", "victim", check=False, timeout=within)
    assert time.monotonic() - t0 < within
    assert res.returncode != 0, res.stdout
    lines: list[str] = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert sorted(p.name for p in (home / "procs").glob("*.json")) == before
    return lines[0]


def edit_manifest(image: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite torpor.json as torpor would write it, leaving torpor.sig alone."""
    doc = json.loads((image / "torpor.json").read_text())
    change(doc)
    (image / "torpor.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def test_the_pristine_image_is_signed_private_and_restores(home: Path, copy: Path) -> None:
    sig = json.loads((copy / "torpor.sig").read_text())
    assert set(sig) == {"key", "sig"}
    assert {p.stat().st_mode & 0o777 for p in copy.iterdir()} == {0o600}
    out = cli(home, "restore", str(copy), "--name", "control").stdout.split()
    assert out[0] == "control"
    os.kill(int(out[1]), signal.SIGKILL)


def test_an_extra_file_is_refused(home: Path, copy: Path) -> None:
    shutil.copy(biggest_pages(copy), copy / "pages-99.img")
    line = refused(home, copy)
    assert "pages-99.img not in its manifest" in line


def test_a_missing_file_is_refused(home: Path, copy: Path) -> None:
    (copy / "core-1.img").unlink()
    line = refused(home, copy)
    assert "core-1.img missing" in line


def test_a_symlink_to_dev_zero_for_a_pages_file_is_refused_fast(home: Path, copy: Path) -> None:
    pages = biggest_pages(copy)
    pages.unlink()
    pages.symlink_to("/dev/zero")
    line = refused(home, copy, within=15)
    assert f"file {pages.name} is a symlink, not a regular file; refused" in line


def test_a_symlink_outside_is_refused_without_telling_its_size(home: Path, copy: Path) -> None:
    secret = Path("/etc/shadow")
    (copy / "core-1.img").unlink()
    (copy / "core-1.img").symlink_to(secret)
    line = refused(home, copy)
    assert "file core-1.img is a symlink, not a regular file; refused" in line
    assert str(secret.stat().st_size) not in line.split(str(copy))[-1]


def test_a_manifest_with_an_empty_file_list_is_refused(home: Path, copy: Path) -> None:
    (copy / "torpor.sig").unlink()  # unsigned, so that the file list itself is what is judged
    edit_manifest(copy, lambda doc: doc.update(files=[]))
    line = refused(home, copy)
    assert "its manifest does not list inventory.img, which every CRIU image has" in line


def test_a_manifest_whose_hashes_were_rewritten_is_caught_by_its_signature(
    home: Path, copy: Path
) -> None:
    pages = biggest_pages(copy)
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0x01
    pages.write_bytes(bytes(data))

    def rehash(doc: dict[str, Any]) -> None:
        for f in doc["files"]:
            if f["name"] == pages.name:
                f["sha256"] = hashlib.sha256(data).hexdigest()

    edit_manifest(copy, rehash)
    line = refused(home, copy)
    assert "torpor.sig does not match its manifest" in line


def test_an_image_directory_writable_by_others_is_refused(home: Path, copy: Path) -> None:
    os.chmod(copy, 0o777)
    line = refused(home, copy)
    assert line.endswith(f"— chmod go-w {copy}")
