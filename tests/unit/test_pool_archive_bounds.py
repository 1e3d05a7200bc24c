"""An archive's headers are bounded before they are read: CPython's tarfile reads a pax or
GNU long-name header whole, of whatever size it declares, before any member is checked. A
crafted archive (a sparse file: no disk used) declaring an 8 GiB pax header is refused with
one line, in a child under an address-space limit far below 8 GiB (never read in the test
runner)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from torpor._pools._archive import MAX_MEMBER

DECLARED = (8 << 30) - 1024  # the largest a ustar size field holds, about
AS_HEADROOM = 2 << 30
RSS_GROWTH = 200 << 20

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from torpor._errors import TorporError
    from torpor._pools import Pool
    from torpor._pools._memory import MemoryBackend

    pool = Pool("b", MemoryBackend())
    with open("/proc/self/status") as fh:
        vm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = vm + int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (want if hard < 0 else min(want, hard), hard))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"error": None, "type": None}
    try:
        pool.import_image(Path(sys.argv[1]))
    except (TorporError, MemoryError) as exc:
        out = {"error": str(exc), "type": type(exc).__name__}
    out["grew"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME], ids=["pax", "gnu"])
def test_a_huge_declared_header_is_refused_unread(
    tmp_path: Path, torpor_home: Path, kind: bytes
) -> None:
    info = tarfile.TarInfo("././@PaxHeader" if kind == tarfile.XHDTYPE else "././@LongLink")
    info.type = kind
    info.size = DECLARED
    path = tmp_path / "hostile.torpor"
    path.write_bytes(info.tobuf(format=tarfile.USTAR_FORMAT))
    os.truncate(path, tarfile.BLOCKSIZE + DECLARED + 2 * tarfile.BLOCKSIZE)  # a hole
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(AS_HEADROOM)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    assert out["type"] == "PoolError", out
    message = out["error"]
    assert "\n" not in message
    assert message.startswith(f"{path} is not a torpor image archive (a header or member of ")
    assert f"more than {MAX_MEMBER + tarfile.BLOCKSIZE} bytes" in message
    assert "`torpor image export NAME@POOL FILE`" in message
    assert out["grew"] < RSS_GROWTH, out
