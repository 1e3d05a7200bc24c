"""Draws random numbers in its main loop while a worker thread loops beside it.

Usage: ``random_loop.py OUT``. An after-restore hook sets ``FLAG`` to the host pid of the copy
it runs in. Every iteration of either loop appends one line to ``OUT/<host pid>``::

    <tag> <host pid when the iteration began> <FLAG when it began> <random number>

``tag`` is ``main`` or ``work``. An iteration that began before the checkpoint and ends in a
restored copy is recognisable by its start pid (the original's). An iteration the copy began
must show the copy's pid as FLAG (the hook ran first) and a number no other copy drew.

The worker checkpoints the process from inside (``leave_running``) into ``OUT/img-inside``
once ``OUT/go-inside`` exists, so the main loop is busy drawing when it happens. From outside,
``torpor checkpoint PID`` asks the channel thread, so both loops are busy.

Lines are written with one ``os.write`` on a file opened ``O_APPEND`` per line: no descriptor
stays open across the checkpoint.
"""

import os
import random
import sys
import threading
import time

import torpor

OUT = sys.argv[1]
FLAG = 0
PACE = 0.001  # seconds between iterations: short, so a loop that is not held races the hooks


def host_pid():
    return int(os.readlink("/proc/self"))


@torpor.after_restore
def set_flag():
    global FLAG
    FLAG = host_pid()


def emit(tag, start, seen, number):
    fd = os.open(os.path.join(OUT, str(host_pid())), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{tag} {start} {seen} {number!r}\n".encode())
    finally:
        os.close(fd)


def pace(count):
    # Fast for the first iterations of each process (original or copy), slow after: the test
    # reads only the first lines, and many copies must not load the machine.
    time.sleep(PACE if count < 50 else 0.05)


def worker():
    done = False
    count = 0
    while True:
        start, seen = host_pid(), FLAG
        emit("work", start, seen, random.random())
        if not done and os.path.exists(os.path.join(OUT, "go-inside")):
            done = True
            result = torpor.checkpoint(os.path.join(OUT, "img-inside"), leave_running=True)
            with open(os.path.join(OUT, "events"), "a") as fh:
                fh.write(f"{host_pid()} checkpointed restored={result.restored}\n")
            count = 0
        count = 0 if start != host_pid() else count + 1
        pace(count)


threading.Thread(target=worker, name="worker", daemon=True).start()
count = 0
while True:
    start, seen = host_pid(), FLAG
    emit("main", start, seen, random.random())
    count = 0 if start != host_pid() else count + 1
    pace(count)
