"""SIGKILL to the CLI at random moments of `torpor image push` into the default (dir) pool:
the pool stays readable, an image it lists restores with its state, a retry of the push
works, and the local image is untouched."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from .harness import TIMEOUT, Fault, Lab, iterate
from .invariants import check_output, check_quiet, restore
from .test_restore_faults import base_image

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.timeout(TIMEOUT)]


def pool_names(lab: Lab) -> set[str]:
    """The images ``torpor images --pool default`` lists (it must work)."""
    return {str(row["name"]) for row in json.loads(lab.ok("images", "--pool", "default", "--json"))}


def test_push_survives_sigkill(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    image, floor, ceiling = base_image(lab)

    def body(i: int, rng: random.Random) -> bool:
        trigger = rng.choice(("start", "start", "pool"))
        # A push of the counter's image takes 0.15-0.3 s, most of it Python starting.
        delay = rng.uniform(0.05, 0.2) if trigger == "start" else rng.uniform(0, 0.05)
        fault = Fault(trigger, round(delay, 4), "cli")
        name = f"p{i}"
        out = lab.run(["image", "push", image, f"{name}@default"], fault)
        check_output(lab, out)
        check_quiet(lab, out)
        listed = pool_names(lab)
        if out.rc == 0:
            assert out.stdout.strip() == f"{name}@default", lab.fail(out.story)
            assert name in listed, lab.fail(f"{out.story}: pushed, yet the pool does not list it")
        if name in listed:
            restore(lab, f"{name}@default", f"rp{i}", floor, ceiling, out.story)
        else:
            retry = lab.cli("image", "push", image, f"{name}@default")
            check_output(lab, retry)
            assert retry.rc == 0, lab.fail(f"{out.story}: the retry failed: {retry.stderr}")
            assert name in pool_names(lab), lab.fail(f"{out.story}: the retry is not listed")
        return out.fired is not None

    iterate(lab, "push-cli", body)
    # The local image was only read: it restores as it did.
    restore(lab, image, "local-after", floor, ceiling, "the local image after every push")
