"""Counts in memory; every 50 ms appends "<host pid> <count>" to stdout (the keeper's log).

One os.write per line: several restored copies share the log (O_APPEND), and print() with
PYTHONUNBUFFERED writes a line in pieces that other copies' pieces would interleave with.
"""

import os
import time

count = 0
while True:
    count += 1
    os.write(1, f"{os.readlink('/proc/self')} {count}\n".encode())
    time.sleep(0.05)
