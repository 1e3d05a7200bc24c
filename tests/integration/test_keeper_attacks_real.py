"""A root keeper's child that dropped to an unprivileged uid, attacking its keeper (issue 11,
item 3): it may get a dump of its own tree only, into a directory it could have made itself,
and nothing outside its own files is read or written. Against real CRIU, with the app under
``torpor run`` (tests/integration/apps/dropper.py).

Real CRIU cannot dump such an app here (its parasite must mount a /proc inside an unprivileged
PID namespace init, and on this VM CRIU lacks CAP_SYS_RESOURCE to ``prlimit`` another uid's
process), so the tests whose dump must succeed for an unprivileged app run the keeper with a
stand-in for ``criu swrk`` (tests/integration/apps/fake_criu.py, the ``fake_criu`` fixture)
that serves the keeper's request as CRIU does. Everything else is real CRIU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._engine import CriuEngine, DumpOptions
from torpor._process._peer import Peer, TreeGuard

from .helpers import APPS, PYTHON, torpor, wait_for

pytestmark = pytest.mark.criu

NOBODY = 65534  # uid and gid (nobody:nogroup)
SECRET = "root's own file\n"


@pytest.fixture
def arena() -> Iterator[Path]:
    """A directory the unprivileged app can reach (pytest's own are root-only): ``out``
    belongs to the app's uid; ``target`` and ``rootdir`` are root's, for the app to aim at."""
    base = Path(tempfile.mkdtemp(prefix="torpor-attack-", dir="/tmp"))
    os.chmod(base, 0o755)
    out = base / "out"
    out.mkdir(mode=0o700)
    os.chown(out, NOBODY, NOBODY)
    (base / "target").write_text(SECRET)
    os.chmod(base / "target", 0o600)
    (base / "rootdir").mkdir(mode=0o700)
    (base / "rootdir" / "kept").write_text(SECRET)
    yield base
    shutil.rmtree(base)


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A root process the app did not start (what it would like dumped)."""
    proc = subprocess.Popen(
        ["sleep", "600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def fake_criu(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """The environment that makes ``torpor run``'s keeper use the stand-in CRIU, and the file
    where the stand-in records each request it served."""
    wrapper = tmp_path / "criu"
    wrapper.write_text(f"#!/bin/sh\nexec '{PYTHON}' '{APPS / 'fake_criu.py'}' \"$@\"\n")
    wrapper.chmod(0o755)
    log = tmp_path / "requests.jsonl"
    yield {"TORPOR_CRIU": str(wrapper), "FAKE_CRIU_LOG": str(log)}, log


def _requests(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _run(
    arena: Path, name: str, *args: str, uid: int = NOBODY, env: dict[str, str] | None = None
) -> int:
    """``torpor run`` the dropper as root; its host pid once it has dropped root."""
    out = str(arena / "out")
    cmd = [PYTHON, str(APPS / "dropper.py"), out, str(uid), str(uid), *args]
    pid = int(torpor("run", "--name", name, "--", *cmd, **(env or {})).stdout.split()[1])
    wait_for(lambda: "dropped" in _events(arena, pid), timeout=20, what="the app to drop root")
    return pid


def _events(arena: Path, pid: int | None = None) -> list[str]:
    path = arena / "out" / "events"
    if not path.exists():
        return []
    rows = [line.partition(" ") for line in path.read_text().splitlines()]
    return [text for p, _, text in rows if pid is None or int(p) == pid]


def _target_untouched(arena: Path) -> None:
    target = arena / "target"
    st = os.lstat(target)
    assert (target.read_text(), st.st_uid, stat.S_IMODE(st.st_mode)) == (SECRET, 0, 0o600)
    assert sorted(os.listdir(arena / "rootdir")) == ["kept"]
    assert (arena / "rootdir" / "kept").read_text() == SECRET


def _private_tree(image: Path) -> dict[str, tuple[int, int]]:
    """(uid, mode) of the image directory and of every file in it, by name ("." the dir)."""
    out = {".": (os.lstat(image).st_uid, stat.S_IMODE(os.lstat(image).st_mode))}
    for name in os.listdir(image):
        st = os.lstat(image / name)
        assert stat.S_ISREG(st.st_mode), name
        out[name] = (st.st_uid, stat.S_IMODE(st.st_mode))
    return out


# -- (a) a dump of another process ------------------------------------------------------------


def test_socketpair_sent_the_old_way_is_refused_and_nothing_is_dumped(
    torpor_home: Path, arena: Path, victim: subprocess.Popen[bytes]
) -> None:
    pid = _run(arena, "oldproto", "old-protocol", str(victim.pid))
    wait_for(lambda: any(e.startswith("loot") for e in _events(arena, pid)), what="the attack")
    assert _events(arena, pid) == [
        "dropped",
        "keeper said {'ok': False, 'error': 'the request carried file descriptors; a keeper "
        "takes none and runs CRIU itself — the app runs an older torpor: upgrade it'}",
        "raw request not sent: Broken pipe",
        "closed",
        "loot []",
    ]
    assert victim.poll() is None


def test_raw_request_written_into_the_handed_socket_never_reaches_criu(
    torpor_home: Path, arena: Path, victim: subprocess.Popen[bytes]
) -> None:
    # The keeper queued its own request before the app got its end: CRIU reads that one (a
    # dump of the app itself, which CRIU cannot do here and says so) and nothing after it.
    pid = _run(arena, "race", "race", str(victim.pid))
    wait_for(lambda: any(e.startswith("loot") for e in _events(arena, pid)), what="the attack")
    # CRIU answers the app's dump (which it cannot do here), or resets the connection when it
    # exits with the app's request unread: either way that request never ran.
    events = _events(arena, pid)
    assert events[1] in ("response success=False", "no response (ConnectionResetError)")
    assert (events[0], events[2:]) == ("dropped", ["loot []"])
    wait_for(lambda: list((torpor_home / "logs").glob(f"dump-{pid}-*.log")), what="the log")
    dumped = re.findall(r"Dumping processes \(pid: (\d+)", _kept_log(torpor_home, pid).read_text())
    assert dumped == [str(pid)]
    assert victim.poll() is None


def test_tree_holding_a_root_process_is_not_dumped(torpor_home: Path, arena: Path) -> None:
    pid = _run(arena, "rootchild", "rootchild")
    wait_for(lambda: len(_events(arena, pid)) == 2, what="the checkpoint")
    [event] = _events(arena, pid)[1:]
    child = next(iter(_children(pid)))
    assert event == (
        f"failed: the keeper refused the checkpoint: dump of process {pid} refused: process "
        f"{child} of its tree runs with other credentials (uids 0/0/0/0, gids 0/0/0/0) than "
        f"uid {NOBODY}, gid {NOBODY}: its memory is not the requester's to have"
    )
    assert os.listdir(arena / "out") == ["events"]


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return {int(p) for p in fh.read().split()}


def test_post_dump_guard_is_installed_for_an_unprivileged_app(
    torpor_home: Path,
    arena: Path,
    fake_criu: tuple[dict[str, str], Path],
    victim: subprocess.Popen[bytes],
) -> None:
    # The tree passes the keeper's check; then, frozen, it holds a root process (the stand-in
    # CRIU shows the action script the victim's tree instead): the dump fails, saying why.
    env, _ = fake_criu
    pid = _run(
        arena, "guarded", "checkpoint", "leave", env={**env, "FAKE_CRIU_INIT_PID": str(victim.pid)}
    )
    wait_for(lambda: len(_events(arena, pid)) == 2, timeout=20, what="the checkpoint")
    assert _events(arena, pid)[1] == (
        f"failed: checkpoint of pid {pid} failed: torpor keeper: process {victim.pid} of the "
        f"tree runs with other credentials than uid {NOBODY}, gid {NOBODY}: its memory is not "
        f"the requester's to have; dump refused (the process keeps running; log: "
        f"{_kept_log(torpor_home, pid)}) — a dump for an unprivileged process covers only "
        "processes with its credentials: end the others (root children, set-uid programs) first"
    )
    assert os.listdir(arena / "out") == ["events"]


def test_post_dump_guard_refuses_a_tree_with_foreign_credentials(tmp_path: Path) -> None:
    # What CRIU runs while the tree is frozen (after the request-time check, which a set-uid
    # exec in between would pass): a thread with other credentials anywhere in the tree fails
    # the dump, and the reason goes into CRIU's log.
    guard = TreeGuard()
    log = tmp_path / "criu-dump.log"
    log.write_text("")
    drop = (
        "import os, time; os.setgroups([]); os.setresgid({0}, {0}, {0}); "
        "os.setresuid({0}, {0}, {0}); time.sleep(60)"
    )
    ours = subprocess.Popen([PYTHON, "-c", drop.format(NOBODY)])  # all nobody
    mixed = subprocess.Popen(["sh", "-c", f"'{PYTHON}' -c '{drop.format(NOBODY)}' & wait"])
    trees = (ours, mixed)
    try:
        wait_for(lambda: _creds(ours.pid)[0] == NOBODY, what="the first tree")
        wait_for(lambda: _children(mixed.pid), what="the second tree")
        [child] = _children(mixed.pid)
        wait_for(lambda: _creds(child)[0] == NOBODY, what="the child to drop root")
        script = guard.options()[1]

        def run(action: str, init: int, peer: Peer) -> int:
            env = dict(
                guard.env(peer),
                CRTOOLS_SCRIPT_ACTION=action,
                CRTOOLS_INIT_PID=str(init),
                CRTOOLS_IMAGE_DIR=str(tmp_path),
            )
            return subprocess.run([script], env=env, check=False).returncode

        nobody = Peer(pid=0, uid=NOBODY, gid=NOBODY, groups=(), cap_prm=0)
        root_uid, root_gid, root_groups, root_caps = _creds(mixed.pid)
        root = Peer(pid=0, uid=root_uid, gid=root_gid, groups=root_groups, cap_prm=root_caps)
        assert run("post-dump", ours.pid, nobody) == 0
        assert run("pre-dump", mixed.pid, nobody) == 0  # only post-dump is checked
        assert log.read_text() == ""
        assert run("post-dump", mixed.pid, nobody) == 1  # the root itself
        assert run("post-dump", mixed.pid, root) == 1  # its child, found by the walk
        line = (
            "(00.000000) Error (torpor keeper): process {} of the tree runs with other "
            "credentials than uid {}, gid {}: its memory is not the requester's to have; dump "
            "refused\n"
        )
        assert log.read_text() == (
            line.format(mixed.pid, NOBODY, NOBODY) + line.format(child, root_uid, root_gid)
        )
    finally:
        for proc in trees:
            for kid in _children(proc.pid):
                os.kill(kid, 9)
            proc.kill()
            proc.wait()


def _creds(pid: int) -> tuple[int, int, tuple[int, ...], int]:
    with open(f"/proc/{pid}/status") as fh:
        fields = {k: v.split() for k, _, v in (line.partition(":") for line in fh)}
    groups = tuple(int(g) for g in fields["Groups"])
    return int(fields["Uid"][0]), int(fields["Gid"][0]), groups, int(fields["CapPrm"][0], 16)


def test_only_the_keepers_own_children_are_served(torpor_home: Path, arena: Path) -> None:
    pid = _run(arena, "idle", "idle")
    keeper = _parent(pid)
    code = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
        f"s.connect(b'\\0torpor-keeper-{keeper}'); s.send(sys.argv[1].encode()); "
        "print(s.recv(4096).decode())"
    )
    request = json.dumps({"v": 1, "op": "collect"})
    # A stranger, and a process inside the app's PID namespace (not the keeper's child).
    for prefix in ([], ["nsenter", "-t", str(pid), "-p", "--"]):
        asker = subprocess.run(
            [*prefix, PYTHON, "-c", code, request], capture_output=True, text=True, check=True
        )
        reply = json.loads(asker.stdout)
        assert reply["ok"] is False
        assert re.fullmatch(
            rf"process \d+ is not a child of keeper {keeper}; refused", reply["error"]
        )


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(next(line for line in fh if line.startswith("PPid:")).split()[1])


@pytest.mark.parametrize("whose", ["unreachable", "root's"])
def test_staging_directory_the_app_could_not_have_made_is_refused(
    torpor_home: Path, arena: Path, whose: str
) -> None:
    if whose == "unreachable":  # the app's own, but inside a directory only root may enter
        staging = arena / "rootdir" / "mine"
        staging.mkdir(mode=0o700)
        os.chown(staging, NOBODY, NOBODY)
        why = "cannot be opened as uid 65534 (Permission denied)"
    else:  # one the app may enter, but root's
        staging = arena / "rootsopen"
        staging.mkdir(mode=0o755)
        why = f"is owned by uid 0, not by the requester (uid {NOBODY})"
    pid = _run(arena, f"foreign-{whose[:4]}", "foreign-staging", str(staging))
    wait_for(lambda: len(_events(arena, pid)) == 2, what="the request")
    assert _events(arena, pid)[1] == f"refused: staging directory {staging} {why}; refused"
    st = os.lstat(staging)
    assert (st.st_uid, os.listdir(staging)) == (NOBODY if whose == "unreachable" else 0, [])


# -- (b) symlinks planted in the staging directory ------------------------------------------------


def test_symlinks_planted_in_the_staging_directory_are_refused(
    torpor_home: Path, arena: Path
) -> None:
    pid = _run(arena, "plant", "plant", str(arena / "target"))
    wait_for(lambda: any(e.startswith("staging") for e in _events(arena, pid)), what="the attack")
    _target_untouched(arena)  # CRIU opens its files O_TRUNC, through symlinks
    staging = arena / "out" / ".img.partial-0"
    names = [".torpor-tmp-1", "criu-dump.log", "inventory.img", "stats-dump", "torpor.json"]
    assert _events(arena, pid) == [
        "dropped",
        f"refused: staging directory {staging} is not empty (holds {', '.join(names)}); refused",
        f'staging ["{names[0]}", "{names[1]}", "{names[2]}", "{names[3]}", "{names[4]}"]',
    ]
    # Handed back as it was (the app made it 0700).
    assert (os.lstat(staging).st_uid, stat.S_IMODE(os.lstat(staging).st_mode)) == (NOBODY, 0o700)


def test_image_name_planted_as_a_symlink_is_not_written_through(
    torpor_home: Path, arena: Path, fake_criu: tuple[dict[str, str], Path]
) -> None:
    env, _ = fake_criu
    pid = _run(arena, "dest", "dest", str(arena / "rootdir"), env=env)
    wait_for(lambda: len(_events(arena, pid)) == 2, timeout=20, what="the dump")
    out = arena / "out"
    assert _events(arena, pid)[1] == (
        f"failed: the keeper could not make the image: image directory {out / 'img'} appeared "
        f"while checkpointing — the new image is kept at {out / '.img.partial-0'}"
    )
    _target_untouched(arena)
    assert os.readlink(out / "img") == str(arena / "rootdir")
    staged = _private_tree(out / ".img.partial-0")
    assert staged.pop(".") == (NOBODY, 0o700)
    assert set(staged.values()) == {(NOBODY, 0o600)}


def test_staging_directory_is_the_keepers_while_criu_writes(
    torpor_home: Path, arena: Path, fake_criu: tuple[dict[str, str], Path]
) -> None:
    env, requests = fake_criu
    pid = _run(arena, "seized", "seized", env=env)
    wait_for(lambda: len(_events(arena, pid)) == 4, timeout=20, what="the dump")
    image = arena / "out" / "img"
    assert _events(arena, pid)[1:] == [
        "file not planted: Permission denied",
        "symlink not planted: Permission denied",
        f"result restored=False image={image}",
    ]
    files = _private_tree(image)
    assert files.pop(".") == (NOBODY, 0o700)
    assert sorted(files) == [
        ".torpor-verified.json",
        f"core-{pid}.img",
        "criu-dump.log",
        "inventory.img",
        "pstree.img",
        "stats-dump",
        "torpor.json",
        "torpor.sig",
    ]
    assert set(files.values()) == {(NOBODY, 0o600)}
    # The request CRIU got was the keeper's: the app's own pid, into the staging directory,
    # nothing more, with the post-dump check of the tree's credentials.
    assert _requests(requests) == [
        {
            "type": 1,
            "pid": pid,
            "leave_running": True,
            "keep_open": False,
            "options": [
                "ext_unix_sk",
                "file_locks",
                "images_dir_fd",
                "leave_running",
                "link_remap",
                "log_file",
                "log_level",
                "notify_scripts",
                "pid",
                "shell_job",
                "tcp_established",
            ],
            "images": str(arena / "out" / ".img.partial-0"),
            "script": True,
        }
    ]


# -- (c) legitimate self-dumps ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["leave", "stop"])
def test_unprivileged_app_checkpoints_itself_into_its_own_private_files(
    torpor_home: Path, arena: Path, fake_criu: tuple[dict[str, str], Path], how: str
) -> None:
    env, requests = fake_criu
    pid = _run(arena, f"legit-{how}", "checkpoint", how, env=env)
    image = arena / "out" / "img"
    wait_for(lambda: (image / "torpor.json").exists(), timeout=30, what="the image")
    if how == "leave":
        wait_for(lambda: len(_events(arena, pid)) == 2, what="the original's result")
        assert _events(arena, pid)[1] == "result restored=False"
    else:
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="the dump to end the original")
        assert _events(arena, pid) == ["dropped"]
    files = _private_tree(image)
    assert files.pop(".") == (NOBODY, 0o700)
    assert {"inventory.img", "pstree.img", "criu-dump.log", "torpor.json"} <= set(files)
    assert set(files.values()) == {(NOBODY, 0o600)}
    [request] = _requests(requests)
    assert (request["pid"], request["leave_running"]) == (pid, how == "leave")
    manifest = json.loads((image / "torpor.json").read_text())
    assert (manifest["pid"], manifest["name"], manifest["coordinated"]) == (pid, "img", True)


def test_root_app_checkpoints_itself_into_private_files_and_is_restored(
    torpor_home: Path, arena: Path
) -> None:
    pid = _run(arena, "legit-root", "checkpoint", "leave", uid=0)
    image = arena / "out" / "img"
    wait_for(lambda: len(_events(arena, pid)) == 2, timeout=30, what="the original's result")
    assert _events(arena, pid)[1] == "result restored=False"
    files = _private_tree(image)
    assert files.pop(".") == (0, 0o700)
    assert {"inventory.img", "pstree.img", "criu-dump.log", "stats-dump"} <= set(files)
    assert set(files.values()) == {(0, 0o600)}
    os.kill(pid, 9)
    # The arena's out/ is the app's (uid 65534): root restores only from directories no other
    # user can swap, so the image's parent is made root's first, as an operator would.
    os.chown(arena / "out", 0, 0)
    new_pid = int(torpor("restore", str(image), "--name", "copy").stdout.split()[1])
    wait_for(lambda: _events(arena, new_pid) == ["result restored=True"], what="the restored copy")


def test_unprivileged_app_is_told_why_real_criu_cannot_dump_it(
    torpor_home: Path, arena: Path
) -> None:
    pid = _run(arena, "nocaps", "checkpoint", "leave")
    wait_for(lambda: len(_events(arena, pid)) == 2, timeout=20, what="the checkpoint")
    assert _events(arena, pid)[1] == (
        f"failed: checkpoint of pid {pid} failed: pie/parasite.c:634: Can't create a directory "
        f"(-13) (the process keeps running; log: {_kept_log(torpor_home, pid)}) — CRIU cannot "
        "dump a process that dropped root while it is pid 1 of its PID namespace (`torpor "
        "run`): keep the app's first process root and drop privileges in its children"
    )
    assert os.listdir(arena / "out") == ["events"]  # its staging directory is gone
    assert os.path.exists(f"/proc/{pid}")


def _kept_log(home: Path, pid: int) -> Path:
    [log] = (home / "logs").glob(f"dump-{pid}-*.log")
    return log


# -- item 6: CRIU's own files ----------------------------------------------------------------------


def test_criu_writes_its_files_0600(
    torpor_home: Path, tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    CriuEngine().dump(victim.pid, images, DumpOptions(leave_running=True))
    modes = {n: stat.S_IMODE(os.lstat(images / n).st_mode) for n in os.listdir(images)}
    assert {"inventory.img", "stats-dump", "criu-dump.log"} <= set(modes)
    assert set(modes.values()) == {0o600}
