"""Fault injection (issue 12 item 6): SIGKILL to the CLI, the keeper, CRIU, the checkpointer
and the agent worker at seeded moments of checkpoint, restore and push, and full disks at
every stage, with torpor's invariants checked after each (see :mod:`.invariants`). Root and
real CRIU, like tests/integration.

Run: ``.venv/bin/pytest -q tests/faults``. ``TORPOR_FAULT_ITERATIONS`` (default 6, what CI
runs) sets the iterations per scenario; ``TORPOR_FAULT_SEED`` replays a run (the seed is in
the report header and in every failure). The suite drives whichever ``torpor`` Python
imports, so ``PYTHONPATH=<checkout>/src`` judges another commit. A scenario does not stop at
its first broken invariant: the failure lists every broken iteration with its story.
"""
