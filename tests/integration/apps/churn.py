"""``churn.py MIB PERCENT``: ``MIB`` MiB of random (incompressible) memory, of which ``PERCENT``
per cent is rewritten with fresh random bytes every second (one contiguous run at a random
place), plus the counter of ``counter.py`` (every 50 ms "<host pid> <count>" to stdout). It
prints nothing until the ballast is in place. The app of the pool-cost acceptance test: ten
checkpoints of it should cost little more than one."""

import os
import random
import sys
import time

mib = int(sys.argv[1])
percent = float(sys.argv[2])
ballast = bytearray(os.urandom(mib << 20))
run = int(len(ballast) * percent / 100)

count = 0
last = time.monotonic()
while True:
    count += 1
    os.write(1, f"{os.readlink('/proc/self')} {count}\n".encode())
    if time.monotonic() - last >= 1.0 and run:
        at = random.randrange(0, len(ballast) - run)
        ballast[at : at + run] = os.urandom(run)
        last = time.monotonic()
    time.sleep(0.05)
