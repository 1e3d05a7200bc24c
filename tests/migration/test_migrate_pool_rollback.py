"""``torpor migrate --mode pool`` failing after the target reported ``running``, on a real lab
and CRIU: the original is thawed *with* its service address (review finding 3: pool mode took
the address down as soon as the target said ``running``, and a failure after that, here the
migration journal that cannot be written, thawed the original without it: the address was on
neither host)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .conftest import Lab
from .test_migrate_pool import COUNTER, counts, ok, paired, ps, server, torpor, wait_for  # noqa: F401
from .test_migrate_tcp import addresses, service_address

pytestmark = pytest.mark.criu


def test_a_failure_after_running_thaws_the_original_with_its_address(
    paired: Lab,  # noqa: F811
    tmp_path: Path,
) -> None:
    lab = paired
    shared = tmp_path / "pool"
    shared.mkdir(mode=0o700)
    for host in ("a", "b"):
        ok(torpor(lab, host, "pool", "create", "back", "dir", f"source={shared}"))
    svc = service_address(lab, 31)
    ok(torpor(lab, "a", "run", "--name", "pback", "--service-address", svc, "--",
              sys.executable, "-c", COUNTER))  # fmt: skip
    wait_for(lambda: len(counts(lab, "a", "pback")) >= 5)
    pid = int(ps(lab, "a", "pback")["pid"])
    assert svc in addresses(lab, "a") and svc not in addresses(lab, "b")
    # a's journal directory is a file: _leftovers.record refuses at post-dump, after the
    # target's "running" (pool mode learns it is running before it writes the journal).
    journal = f"{lab.node('a')['home']}/migrate-undo"
    lab.python("a", "import sys; open(sys.argv[1], 'x').close()", journal)
    try:
        with server(lab, "b") as where:
            res = torpor(
                lab, "a", "migrate", "pback", "--to", where, "--mode", "pool", "--pool", "back"
            )
    finally:
        lab.python("a", "import os, sys; os.unlink(sys.argv[1])", journal)
    assert res.returncode == 1, (res.stdout, res.stderr)
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"torpor: error: migration of pback to {where} failed: migration journal directory "
    ), line
    assert f"(the process runs here, unchanged (pid {pid}))" in line, line
    # The original runs on, here, with its address; b's copy was killed, its address gone.
    assert (ps(lab, "a", "pback")["state"], ps(lab, "a", "pback")["pid"]) == ("running", pid)
    before = counts(lab, "a", "pback")
    wait_for(lambda: len(counts(lab, "a", "pback")) >= len(before) + 5)
    assert svc in addresses(lab, "a")
    assert svc not in addresses(lab, "b")
    assert ps(lab, "b", "pback").get("state") != "running"
    ok(torpor(lab, "a", "kill", "pback"))
