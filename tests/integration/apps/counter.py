"""Counts in memory; every 50 ms appends "<host pid> <count>" to stdout (the keeper's log).

Each restored copy appends to a log of its own (``<home>/logs/NAME.log``, not the original's).
One os.write per line all the same: print() with PYTHONUNBUFFERED writes a line in pieces, which
another process's lines would interleave with were two ever to share a log.
"""

import os
import time

count = 0
while True:
    count += 1
    os.write(1, f"{os.readlink('/proc/self')} {count}\n".encode())
    time.sleep(0.05)
