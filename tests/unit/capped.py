"""Run one operation of torpor's in a child Python whose address space is capped a little above
what it holds once set up: a read of a hostile object of GiB ends there in MemoryError, never
in the test runner (an unbounded read in the runner once brought in the machine's OOM killer).

``setup`` is Python run first, before the cap: its imports, the objects the operation needs, and
a ``run(args)`` that does it (``args``: the strings given after the headroom). The child prints
one JSON line: ``error`` and ``type`` of the TorporError or MemoryError it ended with (None for
neither) and ``grew``, its peak RSS growth over the operation in bytes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

HUGE = 8 << 30  # a hostile object's size (sparse: no disk used)
# Headroom over the child's address space once torpor is imported and the pool opened: its
# threads' stacks and malloc arenas, not 8 GiB.
AS_HEADROOM = 2 << 30
# Peak RSS growth allowed to the operation (the packs it may read are 4 MiB each).
RSS_GROWTH = 200 << 20

# The start of a ``setup`` on a dir pool at ``sys.argv[3]``, the operation named by
# ``sys.argv[2]`` (``run_capped(setup, headroom, op, root)``).
HOSTILE_DIR_POOL = """
    from pathlib import Path
    from torpor._pools import Pool
    from torpor._pools._dir import DirBackend

    op, root = sys.argv[2], Path(sys.argv[3])
    pool = Pool("hostile", DirBackend(root), cache=False)
"""

_CAPPED = """
import json as _json, resource as _resource
from torpor._errors import TorporError as _TorporError

with open("/proc/self/status") as _fh:
    _vm = next(int(_l.split()[1]) * 1024 for _l in _fh if _l.startswith("VmSize:"))
_, _hard = _resource.getrlimit(_resource.RLIMIT_AS)
_want = _vm + int(sys.argv[1])
_resource.setrlimit(_resource.RLIMIT_AS, (_want if _hard < 0 else min(_want, _hard), _hard))
_before = _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss * 1024
_out = {"error": None, "type": None}
try:
    run(sys.argv[2:])
except (_TorporError, MemoryError) as _exc:
    _out = {"error": str(_exc), "type": type(_exc).__name__}
_out["grew"] = _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss * 1024 - _before
print(_json.dumps(_out))
"""


def run_capped(setup: str, headroom: int, *args: str) -> dict[str, Any]:
    """Run ``setup``'s ``run(args)`` in a child capped at its size plus ``headroom`` bytes."""
    code = "import sys\n" + textwrap.dedent(setup) + _CAPPED
    proc = subprocess.run(
        [sys.executable, "-c", code, str(headroom), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return out
