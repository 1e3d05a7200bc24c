"""The lazy migration's fence (docs/migration-lazy.md, Limits), in one place: the source
thaws its original :data:`~torpor._migrate._lazy.FENCE` seconds after its relay failed, which
may be at once on a break; every wait in which the target's copy runs without word from the
source must end, the copy killed, before that, with a margin: the relay's silence
(:data:`~torpor._migrate._lazy.IDLE`) and the daemon's close held for the keeper's word
(:data:`~torpor._migrate._closehold.HOLD_LIMIT`, review finding 6: it was 20 s against a
10 s fence, so both copies could run)."""

from __future__ import annotations

from torpor._migrate import _closehold, _lazy

MARGIN = 2.0  # seconds: the kill through the keeper, a slow host


def test_the_target_gives_up_before_the_source_may_thaw() -> None:
    waits = {"IDLE": _lazy.IDLE, "HOLD_LIMIT": _closehold.HOLD_LIMIT}
    late = {name: s for name, s in waits.items() if s + MARGIN > _lazy.FENCE}
    assert late == {}, f"over FENCE ({_lazy.FENCE} s) - {MARGIN} s"
    assert min(waits.values()) > 0
