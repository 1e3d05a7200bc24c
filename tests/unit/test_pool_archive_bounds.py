"""An archive's headers are bounded before they are read: CPython's tarfile reads a pax or
GNU long-name header whole, of whatever size it declares, before any member is checked. A
crafted archive (a sparse file: no disk used) declaring an 8 GiB pax header is refused with
one line, in a child under an address-space limit far below 8 GiB (never read in the test
runner)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from torpor._pools._archive import MAX_MEMBER

from .capped import AS_HEADROOM, RSS_GROWTH, run_capped

DECLARED = (8 << 30) - 1024  # the largest a ustar size field holds, about

_SETUP = """
    from pathlib import Path
    from torpor._pools import Pool
    from torpor._pools._memory import MemoryBackend

    pool = Pool("b", MemoryBackend())

    def run(args):
        pool.import_image(Path(args[0]))
"""


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
    out = run_capped(_SETUP, AS_HEADROOM, str(path))
    assert out["type"] == "PoolError", out
    message = out["error"]
    assert "\n" not in message
    assert message.startswith(f"{path} is not a torpor image archive (a header or member of ")
    assert f"more than {MAX_MEMBER + tarfile.BLOCKSIZE} bytes" in message
    assert "`torpor image export NAME@POOL FILE`" in message
    assert out["grew"] < RSS_GROWTH, out
