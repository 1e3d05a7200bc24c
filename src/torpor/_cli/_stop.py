"""Ending a managed process: SIGTERM, then SIGKILL after a timeout (``torpor kill``,
``torpor stop``).

A leaf under both commands that end a process (``_run``'s kill, ``_supervise``'s stop), so
neither imports the other for it. The caller has opened a pidfd checked to be the record's
process (:func:`torpor._process._registry.open_checked`): signals go through it only.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._process._proc import ProcRef
    from .._process._registry import ManagedProcess


def stop(pidfd: int, rec: ManagedProcess, timeout: float) -> str:
    """End the process of ``pidfd`` (checked to be ``rec``'s); how it was ended."""
    if _ignores_sigterm_by_default(rec.pid):
        # Outside a namespace SIGTERM would end it at once without any cleanup (its default
        # action): SIGKILL does the same here, where the kernel drops a SIGTERM from outside.
        _send(pidfd, signal.SIGKILL)
        _wait_ended(rec.ref, None)
        return (
            "SIGKILL: it has no SIGTERM handler, and pid 1 of a PID namespace ignores SIGTERM "
            "without one"
        )
    _send(pidfd, signal.SIGTERM)
    if _wait_ended(rec.ref, timeout):
        return "SIGTERM"
    _send(pidfd, signal.SIGKILL)
    _wait_ended(rec.ref, None)
    return f"SIGKILL: it was still running {timeout:g}s after SIGTERM"


def _ignores_sigterm_by_default(pid: int) -> bool:
    """Whether ``pid`` is a PID namespace's init that neither catches, blocks nor ignores
    SIGTERM: the kernel then discards a SIGTERM sent from outside its namespace."""
    from .._process import _proc

    bit = 1 << (signal.SIGTERM - 1)
    try:
        if not _proc.is_namespace_init(pid):
            return False
        wanted = (
            _proc.signal_mask(pid, "SigCgt")
            | _proc.signal_mask(pid, "SigBlk")
            | _proc.signal_mask(pid, "SigIgn")
        )
    except OSError:
        return False  # ended meanwhile: SIGTERM then harms nothing
    return not wanted & bit


def _send(pidfd: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
        signal.pidfd_send_signal(pidfd, sig)


def _wait_ended(ref: ProcRef, timeout: float | None) -> bool:
    """Wait (at most ``timeout`` seconds, or for ever) until ``ref`` has ended."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while ref.alive():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
