"""A restore on a migration's target, run in a forked child holding no descriptor of the
server's (:func:`run_apart`): the keeper the restore forks stays behind as the process's
parent, and would otherwise keep the listening socket and the channel open for as long as the
process lives."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import TorporError
from .._process._registry import ManagedProcess


def run_apart(
    restore: Callable[[], ManagedProcess], *, what: str, keep: Sequence[int] = ()
) -> ManagedProcess:
    """``restore()`` in a forked child that closes every descriptor but stdio and ``keep``;
    the record it made, or its error re-raised here (``what`` names it if the child died
    before it reported)."""
    return Apart(restore, what=what, keep=keep).result()


class Apart:
    """:func:`run_apart` in two steps: the child is forked at once, :meth:`result` waits for
    its reply. Between the two the caller may go on (a migration's target forks the keeper of
    a lazy copy before the image has arrived, see :mod:`._lazy_target`)."""

    def __init__(
        self, restore: Callable[[], ManagedProcess], *, what: str, keep: Sequence[int] = ()
    ) -> None:
        self.what = what
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; the migration tests drive it
            _child(restore, w, keep)
        os.close(w)
        self.pid, self._r = pid, r
        self._reply: ManagedProcess | BaseException | None = None

    def result(self) -> ManagedProcess:
        """The record the child's ``restore()`` made, or its error raised here (once waited
        for, the same answer again)."""
        if self._reply is None:
            try:
                self._reply = self._wait()
            except BaseException as exc:
                self._reply = exc
        if isinstance(self._reply, BaseException):
            raise self._reply
        return self._reply

    def _wait(self) -> ManagedProcess:
        r, pid = self._r, self.pid
        # The keeper inherits the pipe's write end too (it is forked from the child): the
        # reply ends with a newline, and the child's end, not the pipe's, says no more will
        # come.
        data = b""
        exited = False
        try:
            while not data.endswith(b"\n"):
                ready, _, _ = select.select([r], [], [], 0.1)
                if ready:
                    chunk = os.read(r, 1 << 16)
                    if not chunk:
                        break
                    data += chunk
                elif exited:
                    break
                else:
                    exited = os.waitpid(pid, os.WNOHANG)[0] == pid  # one more look, then done
        finally:
            os.close(r)
            if not exited:
                os.waitpid(pid, 0)
        if not data:
            raise TorporError(f"{self.what} died before it reported")
        reply = json.loads(data)
        if not reply["ok"]:
            from .._process import _keeper

            raise _keeper.decode_error(reply["error"])
        fields = reply["rec"]
        fields["command"] = tuple(fields["command"])
        fields["service_addresses"] = tuple(fields.get("service_addresses", ()))
        return ManagedProcess(**fields)


def _child(
    restore: Callable[[], ManagedProcess], w: int, keep: Sequence[int]
) -> None:  # pragma: no cover - the child; the migration tests drive it
    from .._process import _keeper

    code = 0
    try:
        for entry in os.listdir("/proc/self/fd"):
            if int(entry) > 2 and int(entry) != w and int(entry) not in keep:
                with contextlib.suppress(OSError):
                    os.close(int(entry))
        try:
            reply: dict[str, Any] = {"ok": True, "rec": dataclasses.asdict(restore())}
        except BaseException as exc:
            reply = {"ok": False, "error": _keeper.encode_error(exc)}
            code = 1
        os.write(w, json.dumps(reply).encode() + b"\n")
    finally:
        os._exit(code)
