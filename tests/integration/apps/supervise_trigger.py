"""A counter (as counter.py) that ends when told: a file ``abort`` or ``exit0`` in the directory
given as its argument makes it remove the file, then abort (SIGABRT) or exit 0. The file is
removed first, so a restored copy does not end the same way again."""

import os
import sys
import time

where = sys.argv[1]
count = 0
while True:
    count += 1
    os.write(1, f"{os.readlink('/proc/self')} {count}\n".encode())
    for trigger in ("abort", "exit0"):
        path = os.path.join(where, trigger)
        if os.path.exists(path):
            os.unlink(path)
            if trigger == "abort":
                os.abort()
            sys.exit(0)
    time.sleep(0.05)
