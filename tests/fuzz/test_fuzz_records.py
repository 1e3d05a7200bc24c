"""Fuzzing the records of managed processes (``<home>/procs/NAME.json``), which name pids root
signals (``torpor kill``) and dumps (``torpor checkpoint NAME``): planted records with hostile
values (pids of live processes torpor did not start, their real start times, keepers that are
not torpor's), random bytes, symlinks, FIFOs, directories, files of another owner or mode.

Reading them (``load``, ``ps``) ends with success or a :class:`~torpor.TorporError` in bounded
time, and the gate before any signal (``open_checked``) refuses every one of them: ``torpor
kill`` of a planted record signals nothing. The kill itself is run only on records naming
the forked child itself (or no process), so a wrong signal could only end that child, which
fails the example.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from torpor import TorporError
from torpor._cli import main
from torpor._process import _registry
from torpor._process._proc import start_time

from .support import JSON_VALUES, Jail, in_child, mutated_json, scaled

NAME = "app"
NO_PROCESS = 4_000_000  # above pid_max's usual 2**22: never a live process
FOREIGN_UID = 4321

# Symbolic pids, resolved in the child (the child's own pid, its parent, init, no process).
SELF, PARENT, INIT, NONE = "self", "parent", "init", "none"


def _pid(symbol: Any) -> Any:
    if not isinstance(symbol, str):
        return symbol  # a hostile value a mutation put there
    return {SELF: os.getpid(), PARENT: os.getppid(), INIT: 1, NONE: NO_PROCESS}.get(symbol, symbol)


def _resolved(doc: Any) -> Any:
    """``doc`` with symbolic pids and start times made real (in the child)."""
    if not isinstance(doc, dict):
        return doc
    out = dict(doc)
    for key in ("pid", "keeper_pid"):
        if key in out:
            out[key] = _pid(out[key])
    for key, of in (("start_time", "pid"), ("keeper_start_time", "keeper_pid")):
        if out.get(key) == "real":
            pid = out.get(of)
            out[key] = start_time(pid) if isinstance(pid, int) and pid > 0 else 0
    return out


BASE = {
    "name": NAME,
    "pid": SELF,
    "start_time": "real",
    "keeper_pid": PARENT,
    "keeper_start_time": "real",
    "command": ["sleep", "1000"],
    "started": "2026-01-01T00:00:00.000000+00:00",
}


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["json", "json", "json", "json", "any", "bytes", "file"]))
    spec: dict[str, Any] = {"kind": kind}
    if kind == "json":
        doc = dict(BASE)
        doc["pid"] = draw(st.sampled_from([SELF, SELF, PARENT, INIT, NONE]))
        doc["keeper_pid"] = draw(st.sampled_from([PARENT, PARENT, INIT, SELF, NONE]))
        for key in ("start_time", "keeper_start_time"):
            doc[key] = draw(st.sampled_from(["real", "real", 0, 12345]))
        spec["doc"] = draw(st.just(doc) | mutated_json(doc, max_mutations=2))
    elif kind == "any":
        spec["doc"] = draw(JSON_VALUES)
    elif kind == "bytes":
        spec["data"] = draw(st.binary(max_size=64))
    else:
        spec["what"] = draw(st.sampled_from(["symlink", "fifo", "dir", "foreign", "0666"]))
    return spec


def plant(jail: Jail, spec: dict[str, Any]) -> None:
    """Write the record ``spec`` describes (in the child: pids resolve to its own)."""
    procs = jail.home / "procs"
    procs.mkdir(mode=0o700, exist_ok=True)
    path = procs / f"{NAME}.json"
    kind = spec["kind"]
    if kind in ("json", "any"):
        path.write_text(json.dumps(_resolved(spec["doc"])))
    elif kind == "bytes":
        path.write_bytes(spec["data"])
    elif spec["what"] == "symlink":
        other = jail.home / "planted.json"
        other.write_text(json.dumps(_resolved(BASE)))
        path.symlink_to(other)
    elif spec["what"] == "fifo":
        os.mkfifo(path, 0o600)
    elif spec["what"] == "dir":
        path.mkdir(mode=0o700)
    else:
        path.write_text(json.dumps(_resolved(BASE)))
        if spec["what"] == "foreign" and os.geteuid() == 0:
            os.chown(path, FOREIGN_UID, FOREIGN_UID)
        elif spec["what"] == "foreign":
            path.chmod(0o666)  # only root gives a file away: the nearest hostile case
        else:
            path.chmod(0o666)
    os.chmod(procs, 0o700)


def read_and_gate(jail: Jail, spec: dict[str, Any]) -> None:
    """In the child: plant, read every way torpor does, and check the gate refuses."""
    plant(jail, spec)
    os.environ["TORPOR_DEBUG"] = "1"
    try:
        rec = _registry.load(NAME)
    except TorporError:
        rec = None
    if rec is not None:
        try:
            fd = _registry.open_checked(rec)
        except TorporError:
            pass
        else:
            os.close(fd)
            raise AssertionError(f"a planted record passed the gate before a signal: {rec}")
    _registry.list_all()
    assert main(["ps", "-a", "--json"]) in (0, 1)
    if rec is None or rec.pid in (os.getpid(), NO_PROCESS):
        # Signals at most this child, which would then not report: the example fails.
        assert main(["kill", NAME, "--timeout", "0.2"]) == 1, "torpor kill did not refuse"
        assert main(["kill", str(os.getpid()), "--timeout", "0.2"]) == 1


@scaled(0.5)
@given(records())
@example({"kind": "json", "doc": BASE})
@example({"kind": "json", "doc": {**BASE, "keeper_start_time": None}})
@example({"kind": "json", "doc": {**BASE, "pid": -1}})
@example({"kind": "file", "what": "symlink"})
@example({"kind": "file", "what": "fifo"})
@example({"kind": "file", "what": "foreign"})
def test_planted_records(spec: dict[str, Any]) -> None:
    with Jail() as jail:
        in_child(lambda: read_and_gate(jail, spec), seconds=5)
