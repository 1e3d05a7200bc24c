"""A socket peer whose pid is reused by another process before root judges it: the keeper's
peer (its status, "one of my children") and the trigger channel's listener and reply sender
are never judged by the process that got the pid.

Each case runs as pid 1 of a new PID namespace (``unshare --pid --mount-proc``, and a network
namespace of its own for the abstract socket names), where nothing else takes pids: the pid a
peer left behind is handed out again at once by ``ns_last_pid``. Every case first checks that
the naive judgement (``SO_PEERCRED``'s pid, then ``/proc/PID``) does see the other process —
the race is real — and then that torpor's refuses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)"),
]

NOBODY = 65534

CASES = textwrap.dedent(
    """
    import json, os, select, signal, socket, sys, time
    from pathlib import Path

    from torpor._coord import _channel
    from torpor._errors import TorporError
    from torpor._process import _keeper, _peer
    from torpor._process._proc import start_time
    from torpor._process._registry import ManagedProcess

    NOBODY = 65534
    assert os.getpid() == 1, "not the init of a new PID namespace"


    def become(uid, gid=None):
        gid = uid if gid is None else gid
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)


    def hold(after=None):
        # A process that does ``after`` (in it), says so on a pipe and stays; its pid.
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            if after is not None:
                after()
            os.write(w, b"x")
            while True:
                signal.pause()
        os.close(w)
        assert os.read(r, 1) == b"x"
        os.close(r)
        return pid


    def reuse(pid, after=None):
        # A new process with pid ``pid`` (its old process reaped), running ``after``.
        with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
            fh.write(str(pid - 1))
        new = hold(after)
        assert new == pid, f"pid {pid} was not reused ({new})"
        return new


    def peer_that_leaves(connect, serve):
        # A (nobody) connects with ``connect``, forks B to keep the socket and ``serve`` it
        # once B is told to go, and waits to be told to exit. -> (A's pid, its exit pipe, B's
        # go pipe, B's report pipe).
        die_r, die_w = os.pipe()
        go_r, go_w = os.pipe()
        rep_r, rep_w = os.pipe()
        up_r, up_w = os.pipe()
        a = os.fork()
        if a == 0:
            become(NOBODY)
            sock = connect()
            if os.fork() == 0:  # B, the holder
                os.read(go_r, 1)
                os.write(rep_w, json.dumps(serve(sock)).encode())
                os._exit(0)
            os.write(up_w, b"x")
            os.read(die_r, 1)
            os._exit(0)
        assert os.read(up_r, 1) == b"x"
        return a, die_w, go_w, rep_r


    def leave(a, die_w):
        os.write(die_w, b"x")
        os.waitpid(a, 0)  # reaped: its pid is free


    def report(rep_r, timeout=10.0):
        ready = select.select([rep_r], [], [], timeout)[0]
        return json.loads(os.read(rep_r, 65536)) if ready else None


    def naive_keeper_peer(conn):
        # What the keeper's identify did: SO_PEERCRED's pid, then /proc/PID/status.
        pid, uid, gid = _channel._peercred(conn)
        return _peer.peer_of(pid, uid, gid, _peer.read_creds(f"/proc/{pid}/status"))


    def case_identify():
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(b"\\0peer-reuse-keeper")
        listener.listen(1)

        def connect():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(b"\\0peer-reuse-keeper")
            return s

        a, die_w, go_w, rep_r = peer_that_leaves(connect, lambda s: None)
        conn, _ = listener.accept()
        leave(a, die_w)
        reuse(a)  # a root process
        naive = naive_keeper_peer(conn)
        try:
            _peer.identify(conn)
            refused = None
        except TorporError as exc:
            refused = str(exc)
        return {"pid": a, "naive_pid": naive.pid, "naive_privileged": naive.privileged,
                "refused": refused}


    def case_keeper():
        keeper = _keeper.Keeper()
        reached = []

        def start_dump(conn, peer, rec, req):
            reached.append([peer.pid, rec.pid])
            raise TorporError("recorded; not dumped")

        keeper._start_dump = start_dump
        staging = "/tmp/peer-reuse-staging"
        request = {"v": 1, "op": "self-dump", "staging": staging, "dest": "img", "name": "n",
                   "labels": {}, "leave_running": True, "tcp_established": False}
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(b"\\0peer-reuse-keeper")
        listener.listen(1)

        def connect():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(b"\\0peer-reuse-keeper")
            return s

        def serve(s):
            s.send(json.dumps(request).encode())
            return json.loads(s.recv(65536))

        a, die_w, go_w, rep_r = peer_that_leaves(connect, serve)
        conn, _ = listener.accept()
        real = _peer.identify
        seen = {}

        def identify_then_leave(c):
            # The peer is identified (nobody, alive), then exits; a new child of the keeper
            # gets its pid before the keeper looks it up among its children.
            peer = real(c)
            leave(a, die_w)
            child = reuse(a)
            keeper.children[child] = ManagedProcess(
                name="victim", pid=child, start_time=start_time(child) or 0,
                keeper_pid=keeper.pid, command=("sleep",), started="-")
            seen["child"] = child
            os.write(go_w, b"x")
            return peer

        _peer.identify = identify_then_leave
        try:
            keeper._handle(conn)
        finally:
            _peer.identify = real
        return {"pid": a, "child": seen.get("child"), "reached": reached,
                "answer": report(rep_r)}


    def case_listener():
        def connect():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.bind(_channel.listener_address(os.getpid()))
            s.listen(4)
            return s

        def serve(s):
            # Answers every request that reaches it, for 5 s (the probe below sends none).
            s.settimeout(5)
            while True:
                try:
                    conn, _ = s.accept()
                except OSError as exc:
                    return {"asked": None, "error": str(exc)}
                with conn:
                    data = conn.recv(65536)
                    if data:
                        conn.send(json.dumps({"ok": True, "pid": 0}).encode())
                        return {"asked": json.loads(data)}

        a, die_w, go_w, rep_r = peer_that_leaves(connect, serve)
        leave(a, die_w)
        # Another process, set-uid root run by nobody (uids nobody, 0, 0, 0), gets the pid.
        reuse(a, lambda: os.setresuid(NOBODY, 0, 0))
        os.write(go_w, b"x")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            probe.connect(_channel.listener_address(a))
            naive = _channel._peercred(probe)
        naive_believed = naive[0] == a and _channel._may_be(a, naive[1])
        try:
            _channel.request_checkpoint(a, Path("/tmp/peer-reuse-img"),
                                        leave_running=True, tcp_established=False, name=None,
                                        timeout=3)
            refused = None
        except TorporError as exc:
            refused = str(exc)
        return {"pid": a, "naive": list(naive), "naive_believed": naive_believed,
                "refused": refused, "holder": report(rep_r)}


    def case_reply():
        reply = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        reply.bind(b"\\0torpor-reply/1/peer-reuse")
        reply.listen(4)
        target = hold(lambda: become(NOBODY))
        born = start_time(target)
        # A start time is in clock ticks: the target lives on past its first (as any target
        # does), so a process started after it ended is told apart by it.
        time.sleep(0.1)
        os.kill(target, signal.SIGKILL)  # as CRIU does after a dump
        os.waitpid(target, 0)

        def forge():
            become(NOBODY - 1)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(b"\\0torpor-reply/1/peer-reuse")
            s.send(json.dumps({"ok": False, "error": "forged"}).encode())

        reuse(target, forge)  # the forger, alive and connected, has the target's pid
        with open(f"/proc/{target}/status") as fh:
            uids = [ln.split()[1:] for ln in fh if ln.startswith("Uid:")][0]
        return {"pid": target, "naive_uids": uids,
                "believed": _channel._read_reply(target, born, reply)}


    print(json.dumps(globals()["case_" + sys.argv[1]]()), flush=True)
    """
)


def _run(case: str, tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "cases.py"
    script.write_text(CASES)
    proc = subprocess.run(
        [
            *("unshare", "--pid", "--net", "--mount-proc", "--kill-child"),
            *(sys.executable, str(script), case),
        ],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_a_keeper_peer_whose_pid_a_root_process_took_is_refused(tmp_path: Path) -> None:
    out = _run("identify", tmp_path)
    # Judged by its pid, the peer (nobody) would be the root process that took it:
    assert (out["naive_pid"], out["naive_privileged"]) == (out["pid"], True)
    assert out["refused"] == (
        f"cannot identify process {out['pid']}: it has exited; refused"
    ) or out["refused"] == (
        f"cannot hold process {out['pid']} (SO_PEERPIDFD, Linux 6.5): [Errno 3] No such"
        " process; refused"
    )


def test_a_peer_gone_before_the_keeper_looks_it_up_is_not_taken_for_its_new_child(
    tmp_path: Path,
) -> None:
    out = _run("keeper", tmp_path)
    assert out["child"] == out["pid"]  # the keeper's new child has the peer's pid
    assert out["reached"] == []  # no dump was started for the peer as that child
    assert out["answer"] == {
        "ok": False,
        "error": f"cannot identify process {out['pid']}: it has exited; refused",
    } or out["answer"] == {
        "ok": False,
        "error": f"cannot hold process {out['pid']} (SO_PEERPIDFD, Linux 6.5): [Errno 3] No"
        " such process; refused",
    }


def test_a_listener_whose_pid_was_reused_by_the_target_is_not_talked_to(tmp_path: Path) -> None:
    out = _run("listener", tmp_path)
    pid = out["pid"]
    # SO_PEERCRED names the target's pid and one of its uids: the old check believed it.
    assert out["naive"] == [pid, NOBODY, NOBODY] and out["naive_believed"] is True
    assert out["refused"] in (
        f"the socket named for process {pid} cannot identify its process: it has exited —"
        " another process squats on torpor's address; refusing to talk to it",
        f"the socket named for process {pid} cannot hold its process (SO_PEERPIDFD, Linux"
        " 6.5): [Errno 3] No such process — another process squats on torpor's address;"
        " refusing to talk to it",
    )
    assert out["holder"] == {"asked": None, "error": "timed out"}  # no request reached it


def test_a_result_from_a_process_that_took_the_exited_targets_pid_is_ignored(
    tmp_path: Path,
) -> None:
    out = _run("reply", tmp_path)
    # The forger has the target's pid and (being that pid) its uid: the old check believed it.
    assert out["naive_uids"] == [str(NOBODY - 1)] * 4
    assert out["believed"] is None
