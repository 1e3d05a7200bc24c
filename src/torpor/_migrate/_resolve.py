"""``torpor migrate NAME --resolve continue|kill``: settle a migration left in doubt here.

A target whose source went silent between the copy's restore and the source's confirmation
that the original ended cannot know which of the two is the process: CRIU on the source may
have killed the original (then the copy is all there is) or thawed it (then the copy is a
second one). The copy is left *stopped* (the fence, :mod:`._serve`) and its record says
``migrating: from PEER (in doubt: ...)``. Whoever can look at the source decides: ``continue``
lets the copy run (the original is gone), ``kill`` ends it (the original runs there).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal

from .._errors import TorporError
from .._process import _registry
from .._process._keeper import continue_tree

_DOUBT = re.compile(r"from (\S{1,200}) \(in doubt\b")


def resolve(name: str, action: str) -> str:
    """Settle ``name``'s migration in doubt with ``action`` (``continue`` or ``kill``); one
    line saying what was done. Refused, with the fix, unless its record says it is in doubt
    and its process is the one recorded."""
    rec = _registry.load(name)
    m = _DOUBT.match(rec.migrating or "")
    if m is None:
        raise TorporError(
            f"{name} has no migration in doubt here"
            + (f" (its migration: {rec.migrating})" if rec.migrating else ""),
            hint="--resolve is for a copy whose source went silent (see torpor ps)",
        )
    peer = m.group(1)
    _registry.check_live(rec)  # the recorded (pid, start time), or it refuses
    if action == "continue":
        continue_tree(rec.pid)
        _registry.update(name, rec.ref, migrating=None, migrated_from=peer)
        return f"{name} (pid {rec.pid}) continues here: the migration from {peer} is settled"
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec.pid, signal.SIGKILL)
    with contextlib.suppress(OSError, TorporError):
        _registry.update(name, rec.ref, migrating=None, restored_from=f"aborted migration ({peer})")
    return f"{name} (pid {rec.pid}) killed here: the original on {peer} is the process"
