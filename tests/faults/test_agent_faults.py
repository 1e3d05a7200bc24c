"""The same faults with an agent serving the commands (`torpor agent start` in the test's home,
commands through the installed launcher): SIGKILL to the agent worker running the command,
the launcher, CRIU or the checkpointer, during checkpoint and restore."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from . import procs
from .harness import TIMEOUT, Fault, Lab, iterate
from .invariants import check_output, check_ps, check_quiet, continues
from .test_checkpoint_faults import checkpoint_once
from .test_restore_faults import base_image, restore_once

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.timeout(TIMEOUT)]

OPS = ("stop", "restore", "leave-running", "idle-criu", "restore", "idle-worker")
VICTIMS = {
    "checkpoint": ("worker", "cli", "criu", "checkpointer"),
    "restore": ("worker", "cli", "criu"),
}
TRIGGERS = {
    "checkpoint": ("start", "criu", "staging", "pages", "manifest", "image", "app-gone"),
    "restore": ("start", "keeper", "criu", "restored", "record"),
}


def kill_spares(lab: Lab, what: str) -> list[int]:
    """SIGKILL every idle worker of the agent (``idle-worker``) or the CRIU each started ahead
    of time (``idle-criu``), as an OOM killer might; the pids killed."""
    assert lab.agent is not None
    killed = []
    for worker in procs.children(lab.agent.pid):
        w = procs.ref(worker)
        if w is None or lab.keeps_app(w):
            continue
        targets = (
            [w]
            if what == "idle-worker"
            else [r for r in map(procs.ref, procs.children(worker)) if r and procs.is_criu(r.pid)]
        )
        killed += [t.pid for t in targets if procs.signal_ref(t)]
    return killed


def spares_then_restore(lab: Lab, i: int, image: str, bounds: tuple[int, int], what: str) -> bool:
    """Kill the agent's spare workers (or their CRIU), then restore: the agent must not hand
    the command to a broken worker, so the restore works and continues the count."""
    killed = kill_spares(lab, what)
    lab.note(f"  killed {what} {killed}")
    out = lab.cli("restore", image, "--name", f"s{i}", "--json")
    story = f"{out.story} after SIGKILL to the agent's {what} {killed}"
    check_output(lab, out)
    assert out.rc == 0, lab.fail(f"{story}: failed: {out.stderr.strip()}")
    continues(lab, [int(p["pid"]) for p in json.loads(out.stdout)], *bounds, story)
    check_quiet(lab, out)
    check_ps(lab, story)
    return bool(killed)


def test_agent_commands_survive_sigkill(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(agent=True)
    image, floor, ceiling = base_image(lab)

    def body(i: int, rng: random.Random) -> bool:
        op = OPS[i % len(OPS)]
        lab.note(f"  {op} through the agent (pid {lab.agent.pid if lab.agent else '?'})")
        if op.startswith("idle-"):
            return spares_then_restore(lab, i, image, (floor, ceiling), op)
        kind = "restore" if op == "restore" else "checkpoint"
        trigger = rng.choice(TRIGGERS[kind])
        # Through the agent a command takes 0.05-0.15 s (no interpreter start).
        delay = rng.uniform(0, 0.12) if trigger == "start" else rng.uniform(0, 0.02)
        fault = Fault(trigger, round(delay, 4), rng.choice(VICTIMS[kind]))
        if op == "restore":
            return restore_once(lab, i, image, (floor, ceiling), fault, 1 + i % 2)
        return checkpoint_once(lab, i, op, fault)

    iterate(lab, "agent", body)
    assert lab.agent is not None and lab.agent.alive(), "the agent died"
