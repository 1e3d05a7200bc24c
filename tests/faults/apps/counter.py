"""The fault suite's app: counts in memory and every TICK seconds appends "<host pid> <count>"
to STATE (opened, written in one write, closed each time).

Its state is the count, so a restore that continues it is told from a fresh start (which
counts from 1). It writes nothing to stdout (torpor's log may be on a full disk), and holds no
file open between ticks, so any number of copies restore from one image. Usage:
``counter.py STATE TICK``.
"""

import os
import sys
import time

state, tick = sys.argv[1], float(sys.argv[2])
count = 0
while True:
    count += 1
    line = f"{os.readlink('/proc/self')} {count}\n".encode()
    try:
        fd = os.open(state, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass  # a full disk is the test's doing, not a reason to stop counting
    time.sleep(tick)
