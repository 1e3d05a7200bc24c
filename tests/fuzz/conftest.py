"""Hypothesis profiles for the fuzz suite, declared once.

- ``ci`` (loaded when ``CI=true``): 60 examples per property, so the whole suite takes well
  under a minute on 2 cores; derandomized (the same examples on every run, so a red CI run is
  reproducible on any machine) and no example database (nothing written to the checkout).
- ``dev`` (the default elsewhere): 400 examples per property, random, with the example database,
  so a local run explores more and replays what failed before.

``HYPOTHESIS_PROFILE=dev|ci`` overrides the choice; ``explore`` is ``dev`` without the
explicit ``@example`` cases (a known failing one there stops a property before it generates
anything, hiding what else it would find). Expensive properties scale their example
count down from the profile's with :func:`tests.fuzz.support.scaled`.

Every profile has a deadline (a slow example fails); hangs are caught harder than that by
:func:`tests.fuzz.support.bounded`, a per-example alarm.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, Phase, settings

from .support import JAILS

# The suite's examples run in sandboxes made inside the test (fresh per example), never in
# function-scoped fixtures, which Hypothesis would share across examples.
_COMMON = {
    "deadline": timedelta(seconds=5),
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}

settings.register_profile("ci", max_examples=60, derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", max_examples=400, **_COMMON)
settings.register_profile(
    "explore", max_examples=400, phases=[Phase.generate, Phase.target, Phase.shrink], **_COMMON
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") == "true" else "dev")
)


@pytest.fixture(scope="session", autouse=True)
def _remove_jails() -> Iterator[None]:
    """The examples' jails are removed one by one; their parent directory at the end."""
    yield
    shutil.rmtree(JAILS, ignore_errors=True)
