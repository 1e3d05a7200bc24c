"""SIGKILL to the CLI, the new keeper or CRIU at random moments of `torpor restore` (one copy
and --count 2): the image is untouched and restores again with its state, copies the command
reported run, no copy runs unlisted, nothing is left stopped."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from . import procs
from .harness import TIMEOUT, Fault, Lab, iterate
from .invariants import check_output, check_ps, check_quiet, continues, restore

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.timeout(TIMEOUT)]

TRIGGERS = {
    "cli": ("start", "keeper", "criu", "restored", "record"),
    "keeper": ("keeper", "criu", "restored", "record"),
    "criu": ("criu",),
}


def base_image(lab: Lab, name: str = "base") -> tuple[str, int, int]:
    """A clean checkpoint (process stopped) of a counter app: the image's name, and the bounds
    (floor, ceiling] of the first count a restore of it may write."""
    app = lab.start_app(name)
    lab.ok("checkpoint", name, "--name", f"{name}-img")
    assert procs.wait_until(lambda: not app.ref.alive(), 10), lab.fail("the app outlived its dump")
    last = lab.last_count(app.ref.pid)
    # A dump inside the app's write may see it written again after restore: one below.
    return f"{name}-img", last - 1, last + 2


def restore_once(
    lab: Lab, i: int, image: str, bounds: tuple[int, int], fault: Fault, n: int
) -> bool:
    """One faulted restore of ``n`` copies of ``image``, the invariants, and a clean retry."""
    floor, ceiling = bounds
    args = ["restore", image, "--name", f"r{i}", "--json"]
    if n > 1:
        args += ["--count", str(n)]
    out = lab.run(args, fault)
    check_output(lab, out)
    check_quiet(lab, out)
    check_ps(lab, out.story)
    if out.rc == 0:
        pids = [int(p["pid"]) for p in json.loads(out.stdout)]
        assert len(pids) == n, lab.fail(f"{out.story}: reported {len(pids)} copies of {n}")
        for pid in pids:
            assert procs.ref(pid) is not None, lab.fail(f"{out.story}: reported pid {pid} is gone")
        continues(lab, pids, floor, ceiling, out.story)
    restore(lab, image, f"r{i}x", floor, ceiling, f"{out.story}; the retry")
    return out.fired is not None


@pytest.mark.parametrize("victim", ["cli", "keeper", "criu"])
def test_restore_survives_sigkill(make_lab: Callable[..., Lab], victim: str) -> None:
    lab = make_lab()
    image, floor, ceiling = base_image(lab)

    def body(i: int, rng: random.Random) -> bool:
        trigger = rng.choice(TRIGGERS[victim])
        delay = rng.uniform(0, 0.3) if trigger == "start" else rng.uniform(0, 0.02)
        n = 1 + i % 2
        lab.note(f"  {n} cop{'y' if n == 1 else 'ies'}")
        fault = Fault(trigger, round(delay, 4), victim)
        return restore_once(lab, i, image, (floor, ceiling), fault, n)

    iterate(lab, f"restore-{victim}", body)
