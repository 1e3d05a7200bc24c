"""The invariants every fault must leave true, checked after each iteration.

- every error torpor printed is one line, ``torpor: error: ...``, never an internal error or
  a traceback;
- nothing the command touched is left stopped (``T``/``t``), traced or frozen, and nothing it
  started is still at work once it should be done;
- ``torpor ps`` is true: a row says running iff its pid is alive with the recorded start
  time, and every live app of the test has a running row;
- the app runs (and can be checkpointed again), or its image restores and continues its
  count; never neither;
- a command that said it succeeded did: its image restores, its restored copies run;
- no fault leaves an image `torpor images` calls broken (unfinished ones are `incomplete`).
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

from . import procs
from .harness import STAGING_MARK, App, Lab, Outcome
from .procs import Ref

ERROR_PREFIX = "torpor: error: "
# An exception's repr (``OSError(28, ...)``) in a message: an error no boundary converted,
# passed on as it came (the keeper's fallback for non-torpor errors says so: "keeper failed").
FOREIGN = re.compile(r"\b[A-Z]\w*(Error|Exception)\(|keeper failed: ")
REPAIR_HINT = re.compile(r"`torpor image repair (\S+)`")


def check_output(lab: Lab, out: Outcome) -> None:
    """The CLI's output obeys the error rule (a killed CLI printed whatever it got to)."""
    if out.killed:
        return
    story = out.story
    assert out.rc is not None, lab.fail(f"{story}: no exit status")
    for bad in ("Traceback", "internal error"):
        assert bad not in out.stderr, lab.fail(f"{story}: stderr holds {bad!r}: {out.stderr!r}")
    leaked = FOREIGN.search(out.stderr)
    assert leaked is None, lab.fail(
        f"{story}: a foreign exception, not a torpor error: {leaked.group(0)!r} in {out.stderr!r}"
    )
    if out.rc == 0:
        return
    lines = out.stderr.splitlines()
    assert out.rc == 1, lab.fail(f"{story}: exit status {out.rc}, stderr: {out.stderr!r}")
    assert len(lines) == 1, lab.fail(f"{story}: the error is not one line: {out.stderr!r}")
    assert lines[0].startswith(ERROR_PREFIX), lab.fail(f"{story}: not a torpor error: {lines[0]}")


def check_quiet(lab: Lab, out: Outcome) -> None:
    """After the command, nothing it started is still at work (CRIU, a finaliser) and nothing
    is left stopped, traced or frozen."""
    left = lab.settle()
    assert not left, lab.fail(f"{out.story}: still running 20s later: {left}")
    for r in lab.tree.mine():
        state = r.state()
        if state is None:
            continue
        what = f"pid {r.pid} ({' '.join(procs.cmdline(r.pid))[:80]})"
        assert state not in "Tt", lab.fail(f"{out.story}: {what} left stopped (state {state})")
        assert not procs.frozen(r.pid), lab.fail(f"{out.story}: {what} left frozen")
        if lab.is_app(r.pid):
            tracer = procs.tracer(r.pid)
            assert tracer == 0, lab.fail(f"{out.story}: {what} left traced by pid {tracer}")


def check_ps(lab: Lab, story: str) -> list[dict[str, object]]:
    """``torpor ps`` matches the processes; its rows. Judged against the processes as they
    were both before and after `torpor ps` looked (one that changed meanwhile is not judged),
    so the check never races a process ending."""
    apps_before = {r.pid for r in lab.apps()}
    rows = lab.ps()
    running: dict[int, str] = {}
    for row in rows:
        r = Ref(int(row["pid"]), int(row["start_time"]))
        alive = r.alive()
        says = row["state"] == "running"
        if says and not alive and r.pid in apps_before:
            continue  # it ended after `torpor ps` looked
        assert says == alive, lab.fail(
            f"{story}: `torpor ps` says {row['name']} (pid {r.pid}) is {row['state']!r}, "
            f"but it is {'alive' if alive else 'gone'}"
        )
        if says:
            running[r.pid] = str(row["name"])
    apps = {r.pid for r in lab.apps()}
    hidden = (apps & apps_before) - set(running)
    assert not hidden, lab.fail(
        f"{story}: app processes run that `torpor ps` does not list as running: "
        f"{sorted(hidden)} (rows: {json.dumps(rows)})"
    )
    return rows


def continues(lab: Lab, pids: list[int], floor: int, ceiling: int, story: str) -> None:
    """Each of ``pids`` counts on from the image's state: its first count is above ``floor``
    (what the app had counted before the checkpoint began; a fresh start counts from 1) and at
    most ``ceiling``."""
    for pid in pids:
        ok = procs.wait_until(lambda: len(lab.counts().get(pid, [])) >= 2, 10)  # noqa: B023
        assert ok, lab.fail(f"{story}: restored pid {pid} does not count")
        first = lab.counts()[pid][0]
        assert floor < first <= ceiling, lab.fail(
            f"{story}: restored pid {pid} began at {first}, not after its state "
            f"({floor} < count <= {ceiling})"
        )


def restore(lab: Lab, image: str, name: str, floor: int, ceiling: int, story: str) -> None:
    """``torpor restore IMAGE --name NAME`` works and continues the count; the copy is then
    killed (it has proved what it had to)."""
    out = lab.cli("restore", image, "--name", name, "--json")
    check_output(lab, out)
    assert out.rc == 0, lab.fail(f"{story}: its image {image} does not restore: {out.stderr}")
    pids = [int(p["pid"]) for p in json.loads(out.stdout)]
    continues(lab, pids, floor, ceiling, f"{story}; restore of {image}")
    copies = [r for r in map(procs.ref, pids) if r is not None]
    for r in copies:
        procs.signal_ref(r)
    gone = procs.wait_until(lambda: not any(r.alive() for r in copies), 10)
    assert gone, lab.fail(f"{story}: restored copies {pids} outlived SIGKILL")


def image_repair_exists(lab: Lab) -> bool:
    """Whether this torpor has ``torpor image repair`` (asked once per lab)."""
    if lab.can_repair is None:
        lab.can_repair = " repair " in lab.cli("image", "--help").stdout
    return lab.can_repair


def survived(
    lab: Lab,
    app: App,
    out: Outcome,
    *,
    image: str,
    committed: Path | None,
    floor: int,
    leave_running: bool,
) -> str:
    """After a faulted checkpoint of ``app`` into ``image`` (a name, a path or NAME@POOL;
    ``committed``: where a committed local image would be): the app runs, or the image
    restores with its state; never neither. What held, in a word."""
    story = out.story
    alive = app.ref.alive()
    ceiling = lab.last_count(app.ref.pid) + 2
    # A fault may leave an image unfinished (incomplete, for repair), never damaged.
    broken = [row for row in json.loads(lab.ok("images", "--json")) if row.get("state") == "broken"]
    assert not broken, lab.fail(f"{story}: `torpor images` lists broken images: {broken}")
    restorable = _image_exists(lab, image, committed)
    if out.rc == 0:
        assert restorable, lab.fail(f"{story}: said it succeeded, but no image {image}")
        assert alive == leave_running, lab.fail(
            f"{story}: succeeded, yet the app is {'alive' if alive else 'gone'}"
        )
    if restorable:
        restore(lab, image, f"{app.name}-r", floor, ceiling, story)
        return "image" if not alive else "both"
    repairable = None if alive else _repairable(lab, app, out, image, committed)
    if repairable is not None:
        repaired = lab.ok("image", "repair", repairable).strip()
        lab.note(f"  repaired {repairable} into {repaired}")
        assert Path(repaired, "torpor.json").is_file(), lab.fail(
            f"{story}: `torpor image repair {repairable}` printed {repaired!r}, not an image"
        )
        restore(lab, repaired, f"{app.name}-r", floor, ceiling, f"{story}; after repair")
        return "repaired"
    listed = None if alive else _listed_image_of(lab, app)
    if listed is not None:
        # Not where it was asked to go, but torpor knows it: a user finds it in `torpor images`.
        restore(lab, listed, f"{app.name}-r", floor, ceiling, f"{story}; image {listed}")
        return "listed"
    if not alive and trapped_by_killed_criu(lab, app, out):
        lab.note("  lost to CRIU's own death mid-infection (SIGTRAP): docs/checkpoints.md")
        return "trapped"
    assert alive, lab.fail(
        f"{story}: LOST: the app (pid {app.ref.pid}) is gone and there is no image {image} "
        f"(error: {out.stderr.strip() or '-'}; leftovers: {_leftovers(lab, committed)})"
    )
    return "running"


CRIU_KILLED = re.compile(r"CRIU was killed by SIGKILL before it answered \(the process is gone")


def trapped_by_killed_criu(lab: Lab, app: App, out: Outcome) -> bool:
    """The one loss that is CRIU's, not torpor's: CRIU itself SIGKILLed while its parasite ran
    in the app, which CRIU had stopped with its registers and code rewritten. The kernel then
    detaches and resumes the app in that code, whose trap for CRIU (int3) kills it with
    SIGTRAP; only CRIU could have put them back. It is accepted only as exactly that: the fault
    fired on CRIU, the app's record ends with SIGTRAP, and the command said CRIU was killed and
    the process is gone (docs/checkpoints.md)."""
    if out.fault is None or out.fault.victim != "criu" or out.fired is None:
        return False
    record = json.loads((lab.home / "procs" / f"{app.name}.json").read_text())
    if record.get("exit_status") != -signal.SIGTRAP:
        return False
    [line] = [x for x in out.stderr.splitlines() if x.startswith("torpor: error:")] or [""]
    return CRIU_KILLED.search(line) is not None


def _repairable(lab: Lab, app: App, out: Outcome, image: str, committed: Path | None) -> str | None:
    """What to give `torpor image repair` to finish the image of ``app`` the checkpoint kept
    incomplete: what its error said to repair, an image `torpor images` lists as incomplete,
    or the -o path beside which a staging directory is left; None if there is none (or this
    torpor cannot repair)."""
    if not image_repair_exists(lab):
        return None
    said = REPAIR_HINT.search(out.stderr)
    if said:
        return said.group(1)
    for row in json.loads(lab.ok("images", "--json")):
        if row.get("state") == "incomplete" and (
            row.get("name") == image or row.get("pid") == app.ref.pid
        ):
            return str(row["path"])
    if committed is None or committed.parent == lab.home / "images":
        return None
    return (
        str(committed) if any(committed.parent.glob(f".{committed.name}{STAGING_MARK}*")) else None
    )


def _listed_image_of(lab: Lab, app: App) -> str | None:
    """The path of a complete image `torpor images` lists as made from ``app``'s pid."""
    for row in json.loads(lab.ok("images", "--json")):
        if row.get("pid") == app.ref.pid and row.get("state", "complete") == "complete":
            return str(row["path"])
    return None


def _image_exists(lab: Lab, image: str, committed: Path | None) -> bool:
    if "@" in image:
        name, pool = image.rsplit("@", 1)
        rows = json.loads(lab.ok("images", "--pool", pool, "--json"))
        return any(row.get("name") == name for row in rows)
    return committed is not None and (committed / "torpor.json").exists()


def _leftovers(lab: Lab, committed: Path | None) -> list[str]:
    places = [lab.home / "images", lab.home / "cache"]
    if committed is not None:
        places.append(committed.parent)
    out: list[str] = []
    for d in dict.fromkeys(places):
        if d.is_dir():
            out.extend(str(d / n) for n in sorted(p.name for p in d.iterdir()))
    return out


def still_manageable(lab: Lab, app: App, story: str, *where: str) -> None:
    """A live app can be checkpointed again, by its name, leaving it running, into ``where``
    (the options that name the image: the failed command's own, so its leftovers must not
    block the retry; by default a fresh name)."""
    where = where or ("--name", f"{app.name}-again")
    out = lab.cli("checkpoint", app.name, "--leave-running", *where)
    check_output(lab, out)
    assert out.rc == 0, lab.fail(
        f"{story}: the app runs but cannot be checkpointed again: {out.stderr.strip()}"
    )
    assert app.ref.alive(), lab.fail(f"{story}: a --leave-running retry ended the app")
