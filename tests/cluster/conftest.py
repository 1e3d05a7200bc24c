"""Fixtures for tests against a real single-node Ceph cluster (``scripts/ceph-cluster``).

One cluster serves the whole session: started on first use in a temporary directory, always
stopped at the end by the pids it recorded. Without root or without the Ceph daemons the tests
are skipped with the reason; with ``CI=true`` they fail instead, since CI must run them all.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ceph-cluster"
BINARIES = ("ceph-mon", "ceph-mgr", "ceph-osd", "radosgw", "radosgw-admin", "osdmaptool", "ceph")
IN_CI = os.environ.get("CI") == "true"


def unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason``; in CI, fail it (a skipped cluster test proves nothing)."""
    if IN_CI:
        pytest.fail(f"CI must run the cluster tests, but: {reason}", pytrace=False)
    pytest.skip(reason)


def ceph_problem() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "needs root (the cluster tests run real Ceph daemons)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"Ceph is not installed (missing {', '.join(missing)}): run scripts/install-ceph.sh"
    return None


def require_module(name: str, hint: str) -> Any:
    """Import ``name`` or skip (fail in CI) with the install hint."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"no `{name}` module ({exc}): {hint}")


def start_cluster(directory: Path) -> dict[str, Any]:
    """Run ``scripts/ceph-cluster start`` and return its JSON description."""
    try:
        res = subprocess.run(
            [sys.executable, str(SCRIPT), "start", str(directory)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/ceph-cluster start {directory} took over 120 s", pytrace=False)
    if res.returncode != 0:
        pytest.fail(f"scripts/ceph-cluster start failed: {res.stderr.strip()}", pytrace=False)
    info: dict[str, Any] = json.loads(res.stdout)
    return info


def stop_cluster(directory: Path) -> None:
    """Run ``scripts/ceph-cluster stop`` if a daemon was ever recorded in ``directory``."""
    if not (directory / "daemons.json").exists():
        return
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "stop", str(directory)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        pytest.fail(f"scripts/ceph-cluster stop failed: {res.stderr.strip()}", pytrace=False)


def recorded_alive(directory: Path) -> list[str]:
    """The daemons recorded in ``directory`` that still run (zombies count as gone)."""
    alive = []
    for name, entry in json.loads((directory / "daemons.json").read_text()).items():
        try:
            stat = Path(f"/proc/{entry['pid']}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X") and int(fields[19]) == entry["start_time"]:
            alive.append(name)
    return alive


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The session's cluster: the JSON line ``scripts/ceph-cluster start`` printed."""
    problem = ceph_problem()
    if problem:
        unavailable(problem)
    directory = tmp_path_factory.mktemp("ceph")
    try:
        yield start_cluster(directory)
    finally:
        stop_cluster(directory)


@pytest.fixture(scope="session")
def rados_module() -> Any:
    """librados' Python binding (Debian's python3-rados, linked into the venv)."""
    return require_module("rados", "apt-get install python3-rados and run scripts/setup.sh")


@pytest.fixture(scope="session")
def boto3_module() -> Any:
    """boto3, for the s3 driver."""
    return require_module("boto3", "pip install 'torpor[s3]'")


RADOS_TEST_POOL = "torpor-tests"


@pytest.fixture(scope="module")
def admin_ioctx(ceph_cluster: dict[str, Any], rados_module: Any) -> Iterator[Any]:
    """A raw librados handle on the test pool (``RADOS_TEST_POOL``), to write or look under
    the driver."""
    from torpor._pools._rados import RadosBackend

    RadosBackend(
        ceph_cluster["conf"],
        ceph_cluster["cluster"],
        ceph_cluster["rados_user"],
        RADOS_TEST_POOL,
        8,
    ).close()  # fmt: skip  (creates the pool)
    cluster = rados_module.Rados(conffile=ceph_cluster["conf"], name="client.admin")
    cluster.connect(timeout=10)
    ioctx = cluster.open_ioctx(RADOS_TEST_POOL)
    yield ioctx
    ioctx.close()
    cluster.shutdown()
