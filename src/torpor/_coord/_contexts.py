"""The process's contexts, and nothing that starts coordination: a leaf under the checkpoint, the
trigger channel and :mod:`._runtime`, which all use them.

Two contexts sit under one root that the checkpoint notifies:

- the *system* context holds torpor's own resources (the built-in stdlib fixes and the trigger
  channel's listener); it is registered first, so it is told ``before_checkpoint`` last (after
  the application closed what it holds) and ``after_restore`` first (random is reseeded and the
  channel listens again before any application hook runs);
- the *application* context holds the application's resources (``torpor.global_context()``,
  which also starts coordination, returns it).

Between them sits the hold's stage marker: after restore, threads the application marked with
``release_before_hooks`` go on once torpor's own resources are back; the others stay held until
the application's hooks ran too (see :mod:`._hold`).

Contract: reading these contexts has no side effect (no listener, no built-ins); the order of
the root's three members never changes.
"""

from __future__ import annotations

from ._context import Context
from ._hold import HoldStage

_root = Context("torpor")
_system = Context("torpor.system")
_application = Context("global")
_root._register_strong(_system)
# Between the two: after restore, threads marked release_before_hooks go on here.
_root._register_strong(HoldStage())
_root._register_strong(_application)


def root_context() -> Context:
    """The context the checkpoint notifies: torpor's own resources, then the application's."""
    return _root


def system_context() -> Context:
    """torpor's own resources (built-ins, the channel listener)."""
    return _system


def application_context() -> Context:
    """The application's resources, without starting coordination (what
    ``torpor.global_context()`` returns once it started it)."""
    return _application
