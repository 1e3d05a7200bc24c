"""A counter (as counter.py) that checkpoints itself, coordinated and ``leave_running``, when
told: a file ``go`` in the directory given as its argument (removed first) makes it call
``torpor.checkpoint(DIR/img-N, leave_running=True)`` and write ``DIR/done-N`` (its
``restored`` flag) once the call returned. With a second argument ``series`` it calls
``torpor.checkpoint(leave_running=True)`` with no path instead, and ``done-N`` holds
"<restored> <series> <image>"."""

import os
import sys
import time

import torpor

where = sys.argv[1]
no_path = sys.argv[2:] == ["series"]
count = 0
taken = 0
while True:
    count += 1
    os.write(1, f"{os.readlink('/proc/self')} {count}\n".encode())
    go = os.path.join(where, "go")
    if os.path.exists(go):
        os.unlink(go)
        taken += 1
        if no_path:
            result = torpor.checkpoint(leave_running=True)
            said = f"{result.restored} {result.series} {result.image}"
        else:
            result = torpor.checkpoint(os.path.join(where, f"img-{taken}"), leave_running=True)
            said = str(result.restored)
        with open(os.path.join(where, f"done-{taken}"), "w") as fh:
            fh.write(said)
    time.sleep(0.05)
