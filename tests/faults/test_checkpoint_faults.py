"""SIGKILL to the CLI, CRIU or the app's keeper at random moments of `torpor checkpoint`
(process stopped, --leave-running, --pool, -o): the app runs, or its image restores and
continues its count; never neither."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import TIMEOUT, Fault, Lab, iterate
from .invariants import check_output, check_ps, check_quiet, still_manageable, survived

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.timeout(TIMEOUT)]

VARIANTS = ("stop", "leave-running", "pool", "output")
TRIGGERS = {
    "cli": ("start", "criu", "staging", "pages", "manifest", "image", "app-gone"),
    "criu": ("criu", "staging", "pages"),
    # A keeper whose app CRIU killed exits at once: hit it before (or with --leave-running).
    "keeper": ("start", "criu", "staging", "pages"),
    # The checkpointer ends as soon as the image is in place.
    "checkpointer": ("start", "criu", "staging", "pages", "manifest", "app-gone"),
}

LATE = {("criu", "staging"): 0.015, ("criu", "pages"): 0.005, ("checkpointer", "app-gone"): 0.003}


def pick_fault(rng: random.Random, victim: str) -> Fault:
    """A seeded moment for ``victim``: a trigger, then up to 30 ms more (10 for the short-lived
    checkpointer), or up to 350 ms after the start (a checkpoint of the counter takes
    0.2-0.4 s)."""
    trigger = rng.choice(TRIGGERS[victim])
    # CRIU is done some 10 ms after its first page file; the checkpointer soon after the image.
    late = LATE.get((victim, trigger), 0.01 if victim == "checkpointer" else 0.03)
    delay = rng.uniform(0, 0.35) if trigger == "start" else rng.uniform(0, late)
    return Fault(trigger, round(delay, 4), victim)


def checkpoint_once(lab: Lab, i: int, variant: str, fault: Fault) -> bool:
    """One faulted checkpoint of a fresh app, and every invariant after it; whether the fault
    fired."""
    app = lab.start_app(f"a{i}")
    floor = lab.last_count(app.ref.pid)
    img = f"i{i}"
    args = ["checkpoint", app.name, "--name", img]
    committed: Path | None = lab.home / "images" / img
    image, watch = img, [lab.home / "images"]
    if variant == "leave-running":
        args.append("--leave-running")
    elif variant == "pool":
        args += ["--pool", "default"]
        image, committed = f"{img}@default", None
    elif variant == "output":
        out_dir = lab.tmp / "out"
        out_dir.mkdir(exist_ok=True)
        committed = out_dir / img
        args += ["-o", str(committed)]
        image, watch = str(committed), [out_dir]
    out = lab.run(args, fault, keeper=app.keeper, target=app.ref, watch=watch)
    check_output(lab, out)
    check_quiet(lab, out)
    check_ps(lab, out.story)
    held = survived(
        lab,
        app,
        out,
        image=image,
        committed=committed,
        floor=floor,
        leave_running=variant == "leave-running",
    )
    if app.ref.alive():
        # The retry goes where the faulted one went, unless that made its image there.
        made = held in ("image", "both", "repaired", "listed")
        where = (
            ["--name", f"{img}-again"] if made else [a for a in args[2:] if a != "--leave-running"]
        )
        still_manageable(lab, app, out.story, *where)
    lab.note(f"  held: {held}")
    return out.fired is not None


@pytest.mark.parametrize("victim", ["cli", "criu", "keeper", "checkpointer"])
def test_checkpoint_survives_sigkill(make_lab: Callable[..., Lab], victim: str) -> None:
    lab = make_lab()

    def body(i: int, rng: random.Random) -> bool:
        variant = VARIANTS[i % len(VARIANTS)]
        lab.note(f"  variant {variant}")
        return checkpoint_once(lab, i, variant, pick_fault(rng, victim))

    iterate(lab, f"checkpoint-{victim}", body)
