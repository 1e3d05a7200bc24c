"""The counter of ``counter.py`` that cannot survive a restore: a crash-looping app.

``crash_when_restored.py DIR [DELAY]``: it remembers its host pid at start; a copy restored
from a checkpoint runs under another host pid, sees it and exits 1 ``DELAY`` seconds later
(default 0.1), as an app whose checkpointed state makes it crash would. The original runs
until a file ``segv`` appears in ``DIR``: then it reads address 0 (SIGSEGV, a fault of its own:
a signal sent from outside, or by itself, would not reach pid 1 of a PID namespace, SIGKILL
apart; even ``abort()`` ends as a SIGSEGV there, glibc's fallback).
"""

import ctypes
import os
import sys
import time

where = sys.argv[1]
delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
born = os.readlink("/proc/self")
count = 0
restored_at = None
while True:
    count += 1
    me = os.readlink("/proc/self")
    os.write(1, f"{me} {count}\n".encode())
    if me != born:
        restored_at = restored_at or time.monotonic()
        if time.monotonic() - restored_at >= delay:
            os.write(1, f"{me} restored: exiting 1\n".encode())
            sys.exit(1)
    elif os.path.exists(os.path.join(where, "segv")):
        ctypes.string_at(0)
    time.sleep(0.05)
