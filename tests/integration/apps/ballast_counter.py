"""The counter of ``counter.py`` carrying ``MIB`` MiB of touched memory (``ballast_counter.py
MIB``), so that CRIU takes a while to dump it: every 50 ms appends "<host pid> <count>" to
stdout with one os.write. It prints nothing until the ballast is in place."""

import os
import sys
import time

mib = int(sys.argv[1])
ballast = bytearray(mib << 20)
ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))  # every page present

count = 0
while True:
    count += 1
    os.write(1, f"{os.readlink('/proc/self')} {count}\n".encode())
    time.sleep(0.05)
