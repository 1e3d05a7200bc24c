"""Counts in memory; every 50 ms appends "<host pid> <count>" to stdout (the keeper's log)."""

import os
import time

count = 0
while True:
    count += 1
    print(os.readlink("/proc/self"), count, flush=True)
    time.sleep(0.05)
