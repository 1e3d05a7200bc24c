"""A managed app that drops root (``setresgid``/``setresuid`` to UID:GID) and then does what
MODE says: attack its keeper, or checkpoint itself as an app would. Every outcome is a line
"<host pid> <text>" appended to OUT/events (OUT belongs to UID).

    dropper.py OUT UID GID MODE [ARG]

Modes: ``old-protocol VICTIM`` (send the keeper a socketpair end, as torpor used to, then a
raw CRIU request for VICTIM on the other end), ``race VICTIM`` (a sound request, then a raw
CRIU request for VICTIM written into the handed-over socket before hanging up), ``plant TARGET``
(symlinks to TARGET in the staging directory), ``foreign-staging DIR`` (DIR, not made by the
app, as its staging directory), ``dest TARGET`` (the image name is a symlink to
TARGET), ``rootchild`` (a child that stays root, then a checkpoint), ``seized`` (try to write
into the staging directory while the keeper holds it, then finish the dump), ``checkpoint
leave|stop`` (torpor.checkpoint), ``idle``.
"""

import array
import codecs
import ctypes
import json
import os
import socket
import sys
import time
from pathlib import Path

# Everything the app will use is imported while it can still read the interpreter's library
# (under /root here): after the drop it cannot.
import torpor._coord
import torpor._coord._channel
import torpor._coord._checkpoint
import torpor._process._selfdump as selfdump
from torpor._engine import Connection, receive_dump
from torpor._engine._criu import _hint_for, log_errors
from torpor._errors import DumpError, TorporError
from torpor._proto import criu_rpc_pb2 as pb

out, uid, gid, mode = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
arg = sys.argv[5] if len(sys.argv) > 5 else ""
libc = ctypes.CDLL(None, use_errno=True)
_ = (_hint_for, log_errors, torpor._coord._channel, torpor._coord._checkpoint)
codecs.lookup("ascii")  # /proc is read as ASCII


def note(text: str) -> None:
    with open(out / "events", "a") as fh:
        fh.write(f"{os.readlink('/proc/self')} {text}\n")


def raw_dump(pid: int, images_dir: Path) -> bytes:
    """A CRIU DUMP request of ``pid`` into ``images_dir`` (by path), as an attacker writes it."""
    opts = pb.Opts(images_dir_fd=-1, images_dir=str(images_dir), log_file="loot.log")
    opts.pid = pid
    opts.leave_running = True
    return pb.Req(type=pb.DUMP, opts=opts).SerializeToString()


def send_raw(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data)
    except OSError as exc:
        note(f"raw request not sent: {exc.strerror}")


def read_response(sock: socket.socket, timeout: float) -> str:
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except OSError as exc:
        return f"no response ({type(exc).__name__})"
    if not data:
        return "closed"
    resp = pb.Resp()
    resp.ParseFromString(data)
    return f"response success={resp.success}"


def request(staging: Path, dest: str, leave_running: bool) -> dict:
    return {
        "v": 1,
        "op": "self-dump",
        "staging": str(staging),
        "dest": dest,
        "name": dest,
        "labels": {},
        "leave_running": leave_running,
        "tcp_established": False,
    }


def ask(req: dict, before_hangup=None) -> socket.socket | None:
    """Send ``req`` to our keeper; our end of CRIU's socket, or None (the refusal noted)."""
    keeper = selfdump._connect_keeper()
    with keeper:
        keeper.send(json.dumps(req).encode())
        fds = array.array("i")
        data, anc, _, _ = keeper.recvmsg(65536, socket.CMSG_SPACE(4))
        for _level, _kind, blob in anc:
            fds.frombytes(blob[: len(blob) - len(blob) % 4])
        reply = json.loads(data)
        if not reply["ok"]:
            note(f"refused: {reply['error']}")
            return None
        end = socket.socket(fileno=fds[0])
        if before_hangup is not None:
            before_hangup(end)
    return end


def listing(d: Path) -> str:
    return json.dumps(sorted(os.listdir(d)))


if mode == "rootchild" and os.fork() == 0:  # the child stays root
    while True:
        time.sleep(1)


os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
# A process that changed uid is not dumpable: its /proc files are root's, and torpor reads its
# own /proc/self/fd before a checkpoint. Apps that drop privileges set it back likewise.
libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
note("dropped")

if mode == "old-protocol":
    loot = out / "loot"
    loot.mkdir()
    staging = out / ".img.partial-0"
    staging.mkdir(mode=0o700)
    keeper = selfdump._connect_keeper()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with keeper:
        payload = json.dumps({"staging": str(staging), "leave_running": True}).encode()
        fd = array.array("i", [theirs.fileno()])
        keeper.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd)])
        note(f"keeper said {json.loads(keeper.recv(4096))}")
    theirs.close()
    send_raw(ours, raw_dump(int(arg), loot))
    note(read_response(ours, 10))
    note(f"loot {listing(loot)}")

elif mode == "race":
    loot = out / "loot"
    loot.mkdir()
    staging = out / ".img.partial-0"
    staging.mkdir(mode=0o700)
    end = ask(
        request(staging, "img", leave_running=True),
        before_hangup=lambda s: send_raw(s, raw_dump(int(arg), loot)),
    )
    note(read_response(end, 30))
    end.close()
    note(f"loot {listing(loot)}")

elif mode == "plant":
    staging = out / ".img.partial-0"
    staging.mkdir(mode=0o700)
    for name in ("criu-dump.log", "inventory.img", "torpor.json", ".torpor-tmp-1", "stats-dump"):
        os.symlink(arg, staging / name)
    end = ask(request(staging, "img", leave_running=True))
    if end is not None:
        note(f"accepted: {read_response(end, 30)}")
        try:
            selfdump._Collect(selfdump.host_ppid())()
        except DumpError as exc:
            note(f"failed: {exc}")
    note(f"staging {listing(staging)}")

elif mode == "foreign-staging":
    if ask(request(Path(arg), "img", leave_running=True)) is not None:
        note("accepted")

elif mode == "dest":
    staging = out / ".img.partial-0"
    staging.mkdir(mode=0o700)
    os.symlink(arg, out / "img")
    end = ask(request(staging, "img", leave_running=True))
    collect = selfdump._Collect(selfdump.host_ppid())
    try:
        receive_dump(Connection(end), selfdump.host_pid(), staging, settle=collect)
        note("dumped")
    except DumpError as exc:
        note(f"failed: {exc}")

elif mode == "seized":
    staging = out / ".img.partial-0"
    staging.mkdir(mode=0o700)

    def try_to_plant(_end: socket.socket) -> None:
        for what in ("file", "symlink"):
            try:
                if what == "file":
                    (staging / "planted").write_text("x")
                else:
                    os.symlink("/etc/passwd", staging / "criu-dump.log")
                note(f"{what} planted")
            except OSError as exc:
                note(f"{what} not planted: {exc.strerror}")

    end = ask(request(staging, "img", leave_running=True), before_hangup=try_to_plant)
    collect = selfdump._Collect(selfdump.host_ppid())
    try:
        result = receive_dump(Connection(end), selfdump.host_pid(), staging, settle=collect)
        note(f"result restored={result.restored} image={collect.image}")
    except DumpError as exc:
        note(f"failed: {exc}")

elif mode in ("rootchild", "checkpoint"):
    try:
        result = torpor._coord.checkpoint(out / "img", leave_running=arg == "leave")
        note(f"result restored={result.restored}")
    except TorporError as exc:
        note(f"failed: {exc}")

while True:
    time.sleep(0.1)
