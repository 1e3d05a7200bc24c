"""Holds a deleted-but-open file (as gunicorn's workers do) and keeps writing to it: every
0.05 s it appends its host pid and prints "<host pid> <inode> <the file's distinct lines>", so a
restored copy shows whether its file is its own."""

import os
import tempfile
import time

fd, path = tempfile.mkstemp(prefix="torpor-unlinked-")
os.unlink(path)
f = os.fdopen(fd, "w+")
f.write("before\n")
f.flush()
print("ready", flush=True)
while True:
    time.sleep(0.05)
    me = os.readlink("/proc/self")  # the host's procfs: the host pid, which torpor reports
    f.seek(0, os.SEEK_END)
    f.write(f"{me}\n")
    f.flush()
    f.seek(0)
    lines = sorted(set(f.read().split()))
    print(me, os.fstat(f.fileno()).st_ino, ",".join(lines), flush=True)
