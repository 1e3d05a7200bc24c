"""A stand-in for ``criu swrk`` serving one DUMP request as CRIU does, for keeper tests whose
dump must succeed where real CRIU cannot dump the process (on this VM CRIU cannot dump a
process of another uid: it lacks CAP_SYS_RESOURCE for ``prlimit``, and its parasite cannot
mount a /proc inside an unprivileged PID namespace init).

It reads one request, opens the images directory as CRIU does (``/proc/<socket creator>/fd/N``),
creates CRIU's files there the way CRIU does (``O_CREAT|O_TRUNC``, mode 0644 before the umask),
runs the ``--action-script`` at post-dump (on the tree of ``$FAKE_CRIU_INIT_PID`` if set),
writes ``stats-dump`` on success, kills the tree without ``leave_running`` and answers. Each
request it served is appended (JSON) to ``$FAKE_CRIU_LOG``.

    fake_criu.py --version | [--action-script PATH] swrk FD
"""

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import traceback

from torpor._proto import criu_rpc_pb2 as pb


def main(args: list[str]) -> None:
    """Serve one request (module docstring)."""
    if args == ["--version"]:
        print("Version: 4.2.1")
        raise SystemExit(0)
    script = None
    if args[0] == "--action-script":
        script, args = args[1], args[2:]
    assert args[0] == "swrk", args
    sock = socket.socket(fileno=int(args[1]))
    req = pb.Req()
    req.ParseFromString(sock.recv(1 << 16))
    creator = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    opts = req.opts
    images = os.open(f"/proc/{creator}/fd/{opts.images_dir_fd}", os.O_RDONLY | os.O_DIRECTORY)
    with open(os.environ["FAKE_CRIU_LOG"], "a") as log:
        record = {
            "type": req.type,
            "pid": opts.pid,
            "leave_running": opts.leave_running,
            "keep_open": req.keep_open,
            "options": sorted(field.name for field, _ in opts.ListFields()),
            "images": os.readlink(f"/proc/self/fd/{images}"),
            "script": script is not None,
        }
        log.write(json.dumps(record) + "\n")
    for name in ("inventory.img", "pstree.img", f"core-{opts.pid}.img", opts.log_file):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=images)
        os.write(fd, f"fake {name}\n".encode())
        os.close(fd)
    ok = True
    if script is not None:
        env = dict(
            os.environ,
            CRTOOLS_SCRIPT_ACTION="post-dump",
            # A test may make the tree the script walks another one (``FAKE_CRIU_INIT_PID``): what
            # a set-uid exec in the tree after the keeper's own check would amount to.
            CRTOOLS_INIT_PID=os.environ.get("FAKE_CRIU_INIT_PID", str(opts.pid)),
            CRTOOLS_IMAGE_DIR=f"/proc/{os.getpid()}/fd/{images}",
        )
        ok = subprocess.run([script], env=env, check=False).returncode == 0
    if ok:
        fd = os.open("stats-dump", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=images)
        os.close(fd)
        if not opts.leave_running:
            os.kill(opts.pid, signal.SIGKILL)
    resp = pb.Resp(type=pb.DUMP, success=ok, dump=pb.DumpResp(restored=False))
    with contextlib.suppress(BrokenPipeError):  # killed above: as CRIU, answer regardless
        sock.send(resp.SerializeToString())


try:
    main(sys.argv[1:])
except Exception:
    with open(os.environ.get("FAKE_CRIU_LOG", "/dev/null") + ".err", "a") as err:
        traceback.print_exc(file=err)
    raise
