"""Attacks found by the adversarial review of issue 11 (helper R), each refused.

- An image's id is a pool-side field: whoever writes to a pool may give an image any id, the
  id of an image of another pool included. The pull cache is keyed by that id, so a cached copy
  with the right id is not the image asked for unless its whole manifest is the record's: else
  an untrusted image pulled from a pool without a policy would be restored in place of a
  trusted image of a pool that requires signatures.
- The coordination channel's reply socket (``@torpor-reply/...``) is visible to every user in
  ``/proc/net/unix`` and anyone may connect to it: a result is believed only from the process
  asked. And a listener is the target's only if it runs as root or one of the target's uids
  (``SO_PEERCRED`` names the pid that listened, which may be gone and its number reused).
- A directory torpor acts in by path is only as safe as the directories on the way to it:
  whoever can write to a parent can swap it between a check and a use. The home's, a dir
  pool's (and CRIU's image directories': tests/integration/test_review_attacks_real.py)
  parents must be private too; inside a dir pool every directory is reached from the pool's
  fd with ``O_NOFOLLOW``, so a symlink planted as one never leads a write outside.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from torpor._coord import _channel, request_checkpoint
from torpor._errors import CoordinationError, PoolError, UnsafePathError
from torpor._identity import host_identity
from torpor._images._image import Image
from torpor._pools import Pool
from torpor._pools._dir import DirBackend
from torpor._pools._record import image_key
from torpor._pools._sign import Policy
from torpor._safe import check_ancestors

from .test_pool_support import FAST, random_pages
from .test_pool_support import make_image as _make_image


def make_image(root: Path, name: str, seed: int) -> Image:
    return _make_image(root, name, bytes(random_pages(8, seed=seed)))


@pytest.fixture
def other_host(
    torpor_home: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], str]]:
    """Switch to another torpor home (another host identity) and back; returns the key id."""
    homes = {"here": str(torpor_home), "there": str(tmp_path_factory.mktemp("other-host"))}

    def switch(where: str) -> str:
        monkeypatch.setenv("TORPOR_HOME", homes[where])
        return host_identity().key_id

    yield switch
    monkeypatch.setenv("TORPOR_HOME", homes["here"])


def _doc(pool: Pool, name: str) -> dict[str, Any]:
    blob = pool.backend.get(image_key(name))
    return json.loads(zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 24))


def _put_doc(pool: Pool, name: str, doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    pool.backend.put(image_key(name), zstandard.ZstdCompressor().compress(raw))


def _digests(image: Image) -> dict[str, str]:
    return {f.name: f.sha256 for f in image.manifest.files}


def test_a_cached_image_of_another_pool_under_the_same_id_is_not_restored(
    tmp_path: Path, other_host: Callable[[str], str]
) -> None:
    """The attack: pool ``loose`` (no policy, writable by the attacker) holds an image made by
    an untrusted host, its id set to the id of image ``good`` of pool ``strict`` (which
    requires signatures and trusts only this host). Once root pulled the loose image, a pull of
    ``good`` from ``strict`` must still give good's content, not the cached untrusted one."""
    theirs = other_host("there")
    with Pool("loose", DirBackend(tmp_path / "loose"), timing=FAST) as loose:
        loose.push(make_image(tmp_path / "theirs", "evil", seed=2), "evil")
    mine = other_host("here")
    assert mine != theirs
    policy = Policy(require_signed=True)
    with (
        Pool("strict", DirBackend(tmp_path / "strict"), timing=FAST, policy=policy) as strict,
        Pool("loose", DirBackend(tmp_path / "loose"), timing=FAST) as loose,
    ):
        good = make_image(tmp_path / "mine", "good", seed=1)
        strict.push(good, "good")
        good_id = _doc(strict, "good")["manifest"]["id"]
        doc = _doc(loose, "evil")
        doc["manifest"]["id"] = good_id  # not covered by the signature: a pool-side field
        _put_doc(loose, "evil", doc)
        assert loose.image("evil").signer == theirs  # still a validly signed record

        evil = loose.pull("evil")
        assert evil.manifest.id == good_id
        pulled = strict.pull("good")
        pulled.verify(full=True)
        assert pulled.name == "good"
        assert pulled.signer is None  # a cache copy is not vouched for by this host
        assert _digests(pulled) == _digests(good)
        assert _digests(pulled) != _digests(evil)
        # And the other way round: the loose pool's image is its own, not good's.
        again = loose.pull("evil")
        assert _digests(again) == _digests(evil)


# -- the coordination channel -------------------------------------------------------------------

SLOW_APP = textwrap.dedent(
    """
    import os, sys, time
    from dataclasses import dataclass
    from pathlib import Path
    import torpor._coord as coord
    from torpor._coord import _checkpoint

    @dataclass(frozen=True)
    class Outcome:
        restored: bool
        image: Path | None

    def engine(dest, *, leave_running, tcp_established, name, labels):
        time.sleep(1.0)  # the dump takes a while: time for a forger
        return Outcome(False, dest)

    _checkpoint._default = _checkpoint.Coordinator(engine)
    coord.global_context()
    Path(sys.argv[1]).write_text(str(os.getpid()))
    while True:
        time.sleep(1)
    """
)


@pytest.fixture
def slow_app(tmp_path: Path) -> Iterator[int]:
    """A process listening for coordinated checkpoints whose (fake) dump takes a second."""
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_APP, str(ready)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the app did not start"
            time.sleep(0.02)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _forge(requester: int, sent: list[str]) -> None:
    """What any local user can do: find the requester's reply socket in /proc/net/unix and
    send it a result."""
    prefix = f"@torpor-reply/{requester}/"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open("/proc/net/unix") as fh:
            names = [ln.split()[-1] for ln in fh if ln.split()[-1].startswith(prefix)]
        for name in names:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(b"\0" + name[1:].encode())
                forged = {"ok": False, "kind": "PermissionDeniedError", "error": "forged"}
                sent.append(name)
                # The requester may judge the peer (not the target) and hang up before the
                # forgery is written: refused either way.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.send(json.dumps(forged).encode())
                time.sleep(0.2)  # connected and sent: the requester reads it before the app
                return
        time.sleep(0.005)


def test_a_result_forged_on_the_reply_socket_is_ignored(slow_app: int, tmp_path: Path) -> None:
    sent: list[str] = []
    forger = threading.Thread(target=_forge, args=(os.getpid(), sent))
    forger.start()
    try:
        out = request_checkpoint(
            slow_app,
            tmp_path / "img",
            leave_running=True,
            tcp_established=False,
            name="n",
            timeout=20,
        )
    finally:
        forger.join()
    assert len(sent) == 1  # the forgery was sent, and it changed nothing
    assert (out.pid, out.image, out.exited, out.warnings) == (slow_app, tmp_path / "img", False, ())


def test_a_listener_of_another_user_does_not_speak_for_the_target(
    slow_app: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when the squatter's listening process is gone and its pid reused by the target:
    SO_PEERCRED then says the target's pid, but the squatter's uid."""
    stranger = 4242 if os.geteuid() != 4242 else 4343
    real = _channel._peercred
    monkeypatch.setattr(_channel, "_peercred", lambda s: (real(s)[0], stranger, stranger))
    with pytest.raises(CoordinationError) as info:
        request_checkpoint(
            slow_app,
            tmp_path / "img",
            leave_running=True,
            tcp_established=False,
            name="n",
            timeout=20,
        )
    assert str(info.value) == (
        f"the socket named for process {slow_app} belongs to process {slow_app} (uid"
        f" {stranger}) — another process squats on torpor's address; refusing to talk to it"
    )
    assert not (tmp_path / "img").exists()


# -- the way to a directory, and the directories of a dir pool ---------------------------------


def test_a_home_whose_parent_others_can_write_to_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from torpor._cli import main

    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o777)
    monkeypatch.setenv("TORPOR_HOME", str(parent / "home"))
    assert main(["ps"]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == (
        "",
        f"torpor: error: torpor home {parent / 'home'} is refused: {parent} on the way to it"
        f" is writable by others (mode 0777) — chmod go-w {parent}, or use a directory only"
        " its owner can change\n",
    )


def test_missing_parents_of_the_home_are_never_made_writable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torpor import _paths

    home = tmp_path / "a" / "b" / "home"
    monkeypatch.setenv("TORPOR_HOME", str(home))
    old = os.umask(0)
    try:
        assert _paths.home() == home
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (home.parent.parent, home.parent)}
    assert modes == {"a": 0o755, "b": 0o755}


def test_a_sticky_directory_on_the_way_is_accepted(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    (sticky / "mine" / "img").mkdir(parents=True)
    (sticky / "link").symlink_to(sticky / "mine")
    check_ancestors(sticky / "mine" / "img")
    check_ancestors(sticky / "link" / "img")


@pytest.mark.parametrize("how", ["parent", "symlink", "dotdot"])
def test_a_directory_reached_through_one_others_can_write_to_is_refused(
    tmp_path: Path, how: str
) -> None:
    open_dir = tmp_path / "open"
    (open_dir / "img").mkdir(parents=True)
    os.chmod(open_dir, 0o777)
    safe = tmp_path / "safe"
    safe.mkdir()
    (safe / "link").symlink_to(open_dir)
    path = {
        "parent": open_dir / "img",
        "symlink": safe / "link" / "img",
        # After a symlink, ".." is the parent of where it led (not of the link, lexically).
        "dotdot": safe / "link" / ".." / "open" / "img",
    }[how]
    with pytest.raises(UnsafePathError) as info:
        check_ancestors(path, what="image directory")
    assert str(info.value) == (
        f"image directory {path} is refused: {open_dir} on the way to it is writable by others"
        f" (mode 0777) — chmod go-w {open_dir}, or use a directory only its owner can change"
    )


def test_a_dir_pool_whose_parent_others_can_write_to_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o777)
    with pytest.raises(UnsafePathError) as info:
        DirBackend(parent / "pool")
    assert str(info.value).startswith(
        f"dir pool directory {parent / 'pool'} is refused: {parent} on the way to it is"
        " writable by others (mode 0777)"
    )


def test_a_directory_in_a_dir_pool_others_can_write_to_is_refused(
    torpor_home: Path, tmp_path: Path
) -> None:
    root = tmp_path / "pool"
    with Pool("p", DirBackend(root), timing=FAST) as pool:
        pool.push(make_image(tmp_path / "local", "one", seed=3), "one")
        os.chmod(root / "images+", 0o777)
        with pytest.raises(UnsafePathError) as info:
            pool.pull("one")
        assert str(info.value) == (
            f"dir pool directory {root / 'images+'} is writable by others (mode 0777); refused"
            f" — chmod go-w {root / 'images+'}"
        )
        with pytest.raises(UnsafePathError):
            pool.push(make_image(tmp_path / "local", "two", seed=4), "two")


def test_a_symlink_planted_as_a_dir_pool_directory_never_leads_a_write_outside(
    torpor_home: Path, tmp_path: Path
) -> None:
    """The pool's owner (or a copy of another pool's tree) left a symlink where torpor would
    make a directory: a push must write nothing through it."""
    root = tmp_path / "pool"
    outside = tmp_path / "outside"
    outside.mkdir()
    backend = DirBackend(root)
    (root / "packs+").mkdir(mode=0o700)
    for fan in range(256):
        (root / "packs+" / f"{fan:02x}+").symlink_to(outside)
    with Pool("p", backend, timing=FAST) as pool, pytest.raises(PoolError) as info:
        pool.push(make_image(tmp_path / "local", "one", seed=5), "one")
    link = re.escape(str(root / "packs+")) + r"/[0-9a-f]{2}\+"
    assert re.fullmatch(
        rf"dir pool directory ({link}) is a symlink; refused — remove \1: torpor never makes one",
        str(info.value),
    ), str(info.value)
    assert list(outside.iterdir()) == []


# -- the agent's own files ------------------------------------------------------------------------


def test_the_agent_never_opens_its_lock_through_a_planted_symlink(
    torpor_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torpor._agent import _master

    def never(*args: object) -> None:
        raise AssertionError("the agent went on with a lock opened through a symlink")

    monkeypatch.setattr(_master, "_Master", never)
    target = tmp_path / "root-file"
    target.write_text("root's\n")
    (torpor_home / "agent.lock").symlink_to(target)
    with pytest.raises(OSError) as info:
        _master.serve()
    assert info.value.errno == errno.ELOOP
    assert target.read_text() == "root's\n"
