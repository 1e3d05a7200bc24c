"""The agent worker's admission pieces: the client held by a pidfd, what is compared, where a
client's cgroup is mounted, and the Ctrl-C watch thread's signal mask."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from torpor._agent import _admit, _worker


def _listener(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(path)
    sock.listen(1)
    return sock, path


def test_a_live_client_is_held_and_identified(tmp_path: Path) -> None:
    listener, path = _listener(tmp_path)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the client
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        os.read(r, 1)
        os._exit(0)
    try:
        conn, _ = listener.accept()
        client = _admit.Client(conn)
        assert client.pid == pid
        assert client.verified("read") == "read"
        client.close()
        conn.close()
    finally:
        os.write(w, b"x")
        os.waitpid(pid, 0)
        listener.close()


def test_a_client_gone_before_it_is_judged_is_declined(tmp_path: Path) -> None:
    listener, path = _listener(tmp_path)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - connects and exits at once
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        os._exit(0)
    os.waitpid(pid, 0)  # reaped: the pid it connected with is free for anyone
    conn, _ = listener.accept()
    with conn, pytest.raises(_admit.Declined):
        client = _admit.Client(conn)  # the pidfd names a process that has exited
        client.verified(None)
    listener.close()


def test_the_root_directory_lsm_label_and_seccomp_filters_are_compared(tmp_path: Path) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - a chrooted process
        os.chroot(tmp_path)
        os.write(w, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        os.read(r, 1)
        theirs, ours = _admit.confinement(pid), _admit.confinement("self")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert theirs["root directory"] != ours["root directory"]
    assert {k: v for k, v in theirs.items() if k != "root directory"} == {
        k: v for k, v in ours.items() if k != "root directory"
    }
    assert {"LSM label", "Seccomp_filters", "root directory"} <= set(ours)


MOUNTS = [
    ("cgroup2", "/", "/sys/fs/cgroup/unified", {"rw"}),
    ("cgroup", "/", "/sys/fs/cgroup/cpu", {"rw", "cpu"}),
    ("cgroup", "/", "/sys/fs/cgroup/cpu,cpuacct", {"rw", "cpu", "cpuacct"}),
    ("cgroup", "/box", "/mnt/pids", {"rw", "pids"}),
]


@pytest.mark.parametrize(
    ("key", "path", "expected"),
    [
        (("0", ""), "/a/b", "/sys/fs/cgroup/unified/a/b"),
        (("3", "cpu,cpuacct"), "/x", "/sys/fs/cgroup/cpu,cpuacct/x"),
        (("4", "pids"), "/box/in", "/mnt/pids/in"),
        (("4", "pids"), "/elsewhere", None),  # not under the mount's root
        (("5", "memory"), "/m", None),  # not mounted
    ],
)
def test_where_a_cgroup_is_mounted(key: tuple[str, str], path: str, expected: str | None) -> None:
    assert _admit._directory(key, path, MOUNTS) == expected


def test_the_ctrl_c_watch_thread_blocks_every_signal() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            code = _watch_mask_scenario()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # 5: a signal the watch thread may take


def _watch_mask_scenario() -> int:
    import torpor._cli

    wanted = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1}

    def main(argv: list[str]) -> int:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            tids = [int(t) for t in os.listdir("/proc/self/task") if int(t) != os.getpid()]
            masks = []
            for tid in tids:
                with open(f"/proc/self/task/{tid}/status") as fh:
                    masks += [int(ln.split()[1], 16) for ln in fh if ln.startswith("SigBlk")]
            if len(masks) == 1 and all(masks[0] & (1 << (s - 1)) for s in wanted):
                return 0
            time.sleep(0.01)
        return 5

    torpor._cli.main = main  # type: ignore[assignment]  # the fork's own copy
    worker_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert threading.active_count() == 1
    code = _worker._run_cli(("ps",), worker_end)
    client_end.close()
    worker_end.close()
    return code
