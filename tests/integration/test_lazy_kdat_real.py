"""CRIU's kernel-facts cache made where CRIU cannot keep it (``_engine._kdat``), on real CRIU.

Each test runs in a child in a private mount namespace (``unshare -m``), so nothing it mounts
is seen by the host: there ``ensure`` must leave a read-only tmpfs file bind-mounted over
``/run/criu.kdat`` that CRIU itself then loads (its ``-v4`` log says ``Loaded kdat cache``)
instead of probing the kernel, and a CRIU binary changed since must get a new one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from torpor._engine import _kdat, find_criu

pytestmark = pytest.mark.criu

_CHILD = r"""
import json, os, shutil, subprocess, sys, time
from pathlib import Path
from torpor._engine import _kdat
binary, work = sys.argv[1], Path(sys.argv[2])
out = {"before": _kdat.current(binary)}
t = time.perf_counter()
out["ensured"] = _kdat.ensure(binary)
out["ensure_s"] = time.perf_counter() - t
t = time.perf_counter()
out["again"] = _kdat.ensure(binary)
out["again_s"] = time.perf_counter() - t
try:
    with open(_kdat.KDAT, "ab"):
        pass
    out["writable"] = True
except OSError:
    out["writable"] = False
out["mounts"] = [l.split()[4] for l in open("/proc/self/mountinfo") if " /run/criu.kdat " in l]
subprocess.run([binary, "lazy-pages", "-D", str(work), "-W", str(work), "-v4", "-o", "log"],
               cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL, check=False)
out["log"] = (work / "log").read_text(errors="replace")[:4000]
if len(sys.argv) > 3:  # a CRIU changed since: a copy of the binary, newer than the cache
    newer = sys.argv[3]
    time.sleep(0.01)
    shutil.copy2(binary, newer)
    os.utime(newer)  # its ctime now: after the cache's mtime
    out["newer_before"] = _kdat.current(newer)
    out["newer_ensured"] = _kdat.ensure(newer)
    out["mounts_after"] = [
        l.split()[4] for l in open("/proc/self/mountinfo") if " /run/criu.kdat " in l
    ]
print(json.dumps(out))
"""


def _in_private_ns(tmp_path: Path, *extra: str) -> dict[str, object]:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    if not _kdat.enabled():
        pytest.skip("/run is a tmpfs here: CRIU keeps its cache itself")
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(_kdat.__file__).parents[2]))
    env.pop(_kdat.ENV, None)
    res = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", _CHILD,
         find_criu(), str(work), *extra],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def test_criu_loads_the_cache_ensure_made(tmp_path: Path) -> None:
    out = _in_private_ns(tmp_path)
    assert out["ensured"] is True and out["again"] is True
    assert "Loaded kdat cache from /run/criu.kdat" in str(out["log"]), out["log"]
    assert out["mounts"] == ["/run/criu.kdat"]  # one bind, the tmpfs's own mount detached
    assert out["writable"] is False
    assert float(str(out["again_s"])) < 0.01  # once made: a few system calls


def test_a_criu_changed_since_gets_a_new_cache(tmp_path: Path) -> None:
    newer = tmp_path / "criu-copy"
    out = _in_private_ns(tmp_path, str(newer))
    assert out["ensured"] is True
    assert out["newer_before"] is False  # copied after the cache was made: outdated for it
    assert out["newer_ensured"] is True
    assert out["mounts_after"] == ["/run/criu.kdat"]  # the old one detached, not stacked
