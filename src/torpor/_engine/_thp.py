"""A restoring CRIU starts with transparent huge pages off, so no page of memory the restore
leaves lazy is made up by the kernel.

CRIU's restore premaps each task's private memory and reads the eager pages into it before
the restorer registers the lazy ranges with userfaultfd. Where a VMA holds both (torpor's warm
set: the pages a copy faults in its first moments are restored eagerly, the rest of the same
VMA stays lazy, ``_lazy/_eager.py``) and THP is ``always`` on the host, the first eager page
read into a 2 MiB-aligned range allocates a huge page there: its other 511 pages exist from
then on, filled with zeros. Registered with userfaultfd afterwards, they never fault: the copy
reads zeros where its memory should be, and the lazy-pages daemon's ``UFFDIO_COPY`` of them
fails with EEXIST for ever (CRIU 4.2 takes that as "0 pages copied" and retries the same range:
one core at 100 %, the copy never resident, its log growing without end). Seen here with THP
``always``: a lazy copy's checksum wrong, the daemon spinning. CRIU itself turns THP off for
the restore only when the image has a parent (pre-dumps), reasoning that a lazy VMA is empty
until it is registered: true of bare CRIU, not of a VMA with eager pages in it.

``PR_SET_THP_DISABLE`` is inherited by a fork and kept across execve, and CRIU's restorer sets
each task's own flag back from its image (``thp_disabled`` in ``mm.img``) before the task
resumes. So a ``criu swrk`` started with the flag set restores tasks that premap and fill
their memory in small pages, and resume with THP as they had it: what they allocate after the
resume gets huge pages as before, and khugepaged may collapse the restored memory later
(never a range registered with userfaultfd while it has holes).

The flag is per process (its mm), not per thread: :func:`children_without_thp` sets it in this
process for the moment of the spawn, under a lock, and puts back what it was. A child spawned
meanwhile by another thread (the keeper's other copies' CRIUs and daemons) inherits it too;
that costs it nothing. Where the kernel has no such prctl (before 3.15) nothing is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42

_lock = threading.Lock()
_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg: int = 0) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return int(_libc.prctl(option, arg, 0, 0, 0))


def disabled() -> bool | None:
    """Whether THP is off for this process (None: the kernel cannot say)."""
    got = _prctl(PR_GET_THP_DISABLE)
    return None if got < 0 else bool(got)


@contextlib.contextmanager
def children_without_thp() -> Iterator[None]:
    """Processes spawned inside start with THP off (see the module docstring)."""
    with _lock:
        before = _prctl(PR_GET_THP_DISABLE)
        if before < 0 or before == 1:  # no such prctl, or off already
            yield
            return
        if _prctl(PR_SET_THP_DISABLE, 1) != 0:
            yield
            return
        try:
            yield
        finally:
            _prctl(PR_SET_THP_DISABLE, 0)
