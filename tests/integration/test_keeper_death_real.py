"""A managed process whose keeper is SIGKILLed (fault findings F2 and F3), with real CRIU.

F2: the app runs on, re-parented; it is still torpor's (same pid and start time, pid 1 of its
PID namespace, ``TORPOR_MANAGED`` in its environment), so ``checkpoint NAME`` and ``kill NAME``
work on it, and on a restored copy whose keeper died too. F3: a keeper killed during a restore
leaves no copy running unrecorded: the keeper is made to SIGKILL itself (through a
``sitecustomize`` on the CLI's ``PYTHONPATH``) right after CRIU's ``post-restore`` record, or
once the copies run but before their final records; the CLI then kills what it had restored.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import pytest

from torpor._process._proc import ProcRef, start_time

from .helpers import APPS, PYTHON, torpor, wait_for

pytestmark = pytest.mark.criu

# Kills the keeper at the point TVH_DIE names. Only the keeper calls Keeper.record, and only the
# keeper commits a record marked restoring.
_SITE = """
import os, signal
_where = os.environ.get("TVH_DIE")
if _where:
    from torpor._process import _keeper, _registry
    if _where == "record":
        def _record(self, recs, names):
            os.kill(os.getpid(), signal.SIGKILL)
        _keeper.Keeper.record = _record
    elif _where == "post-restore":
        _commit = _registry.Reservation.commit
        def _commit_then_die(self, rec):
            _commit(self, rec)
            if rec.restoring is not None:
                os.kill(os.getpid(), signal.SIGKILL)
        _registry.Reservation.commit = _commit_then_die
"""


def _record(home: Path, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((home / "procs" / f"{name}.json").read_text())
    return data


def _kill_keeper(home: Path, name: str) -> None:
    """SIGKILL the keeper the record of ``name`` names (started by this test) and wait."""
    rec = _record(home, name)
    keeper = ProcRef(int(str(rec["keeper_pid"])), int(str(rec["keeper_start_time"])))
    assert keeper.alive()
    os.kill(keeper.pid, signal.SIGKILL)
    wait_for(lambda: not keeper.alive(), what="the keeper to end")


def _ps(home: Path) -> dict[str, tuple[str, bool]]:
    rows = json.loads(torpor("ps", "--json").stdout)
    return {r["name"]: (r["state"], r["keeper_alive"]) for r in rows}


def _managed_as(name: str) -> list[int]:
    """Live processes started with TORPOR_MANAGED=name (the app and any restored copies)."""
    out = []
    want = f"TORPOR_MANAGED={name}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if want in env.split(b"\0"):
            out.append(int(entry))
    return sorted(out)


def test_a_process_whose_keeper_died_is_still_managed(torpor_home: Path) -> None:
    torpor("run", "--name", "k1", "--", PYTHON, str(APPS / "counter.py"))
    pid = int(str(_record(torpor_home, "k1")["pid"]))
    _kill_keeper(torpor_home, "k1")
    out = torpor("checkpoint", "k1", "--leave-running", "--name", "img1", check=False)
    assert (out.returncode, out.stdout.strip()) == (0, str(torpor_home / "images" / "img1")), out
    assert _ps(torpor_home) == {"k1": ("running", False)}
    table = torpor("ps").stdout.splitlines()[1].split()
    assert table[:5] == ["k1", str(pid), "running,", "no", "keeper"]
    assert ProcRef(pid, int(str(_record(torpor_home, "k1")["start_time"]))).alive()

    torpor("restore", "img1", "--name", "c1")
    copy = _record(torpor_home, "c1")
    assert (copy["managed_as"], copy["restoring"]) == ("k1", None)
    _kill_keeper(torpor_home, "c1")
    assert _ps(torpor_home) == {"k1": ("running", False), "c1": ("running", False)}

    for name in ("c1", "k1"):
        rec = _record(torpor_home, name)
        ref = ProcRef(int(str(rec["pid"])), int(str(rec["start_time"])))
        stopped = torpor("kill", name)
        assert stopped.stderr.strip() == (
            f"stopped {name} (pid {ref.pid}) with SIGKILL: it has no SIGTERM handler, and "
            "pid 1 of a PID namespace ignores SIGTERM without one"
        )
        assert not ref.alive()


def test_a_planted_record_for_a_process_of_another_name_is_refused(torpor_home: Path) -> None:
    torpor("run", "--name", "k2", "--", PYTHON, str(APPS / "counter.py"))
    rec = _record(torpor_home, "k2")
    _kill_keeper(torpor_home, "k2")
    # The same live process, claimed under another start name: not proved, nothing signalled.
    planted = dict(rec, name="p2", managed_as="someone-else")
    path = torpor_home / "procs" / "p2.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, json.dumps(planted).encode())
    os.close(fd)
    refused = torpor("kill", "p2", check=False)
    assert refused.returncode != 0
    assert refused.stderr.strip() == (
        f"torpor: error: record 'p2' names pid {rec['pid']}, which torpor did not start (its "
        f"parent is pid 1, not the recorded keeper {rec['keeper_pid']}); nothing signalled — "
        f"the record is stale or planted: remove {path}"
    )
    assert ProcRef(int(str(rec["pid"])), int(str(rec["start_time"]))).alive()


@pytest.mark.parametrize("where", ["post-restore", "record"])
def test_a_keeper_killed_during_restore_leaves_nothing_unrecorded(
    torpor_home: Path, tmp_path: Path, where: str
) -> None:
    # A name of its own: copies other runs left would count as this test's otherwise.
    k3 = f"k3-{os.getpid()}-{where}"
    torpor("run", "--name", k3, "--", PYTHON, str(APPS / "counter.py"))
    app = int(str(_record(torpor_home, k3)["pid"]))
    torpor("checkpoint", k3, "--leave-running", "--name", "img3")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(_SITE))
    pythonpath = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    failed = torpor(
        "restore", "img3", "--name", "r3", "--count", "2",
        check=False, TVH_DIE=where, PYTHONPATH=pythonpath,
    )  # fmt: skip
    assert failed.returncode != 0
    if where == "post-restore":
        # The keeper died before answering CRIU: CRIU kills the copy, or the CLI does first.
        assert failed.stderr.split(";")[0] in {
            "torpor: error: the keeper died before reporting",
            *(
                f"torpor: error: the keeper died before reporting (killed what it had restored: "
                f"{names})"
                for names in ("r3-1", "r3-2", "r3-1, r3-2")
            ),
        }
    else:
        assert failed.stderr.split(";")[0] == (
            "torpor: error: the keeper died before reporting (killed what it had restored: "
            "r3-1, r3-2)"
        )
    # Nothing but the original runs, and ps lists exactly that.
    wait_for(
        lambda: _managed_as(k3) == [app],
        what=f"the copies to be gone ({_managed_as(k3)}, app {app}, {failed.stderr!r})",
    )
    assert _ps(torpor_home) == {k3: ("running", True)}
    assert sorted(os.listdir(torpor_home / "procs")) == [f"{k3}.json"]
    # And a retry works.
    torpor("restore", "img3", "--name", "r4")
    copy = _record(torpor_home, "r4")
    assert start_time(int(str(copy["pid"]))) == copy["start_time"]
    assert copy["restoring"] is None
