"""The target relay's hold on the lazy-pages daemon's close (a mixin of :class:`._relay._Relay`).

``criu lazy-pages`` sends ``PS_IOV_CLOSE`` when its loop ends, also on an error with pages
missing, and the source's CRIU kills the original when it gets it. So on the target, with
``confirm`` (the keeper's socket), the relay holds the close back: the daemon gets the page
server's answer here (a status of 0, which its exit code does not depend on; what is still due
to it, and what the source sends from now on, is dropped: it asked for nothing more), and the
close goes on only once the keeper says the daemon exited 0 (:data:`DAEMON_OK`, sent by
:meth:`._lazy_target.RelayedPages.daemon_ended`); else the relay fails, and the source, which
never had the close, takes its original back.

While the close waits for the keeper's word, an empty frame goes to the source each
:data:`KEEPALIVE` seconds (its relay gives up after 8 s of silence, and the word may come only
once the keeper's restore is done); the relay fails after :data:`HOLD_LIMIT` seconds without
one.
"""

from __future__ import annotations

import contextlib
import socket
import time

from ._channel import _HEADER, ChannelError

CLOSED_STATUS = b"\0\0\0\0"  # CRIU's page server's answer to PS_IOV_CLOSE: int32 status 0
DAEMON_OK, DAEMON_FAILED = b"0", b"X"  # the keeper's word on the daemon's end (daemon_ended)
# Seconds a held close waits for that word (it comes once the keeper's restore has ended).
# Under the source's fence (_lazy.FENCE) with a margin: a source whose relay fails (at once,
# on a break) thaws its original FENCE seconds later, and a source in the hold sends nothing,
# so the target cannot tell; its copy must be dead by then (tests/unit/test_migrate_fence.py).
HOLD_LIMIT = 7.0
KEEPALIVE = 1.0  # seconds between the empty frames that keep the source's relay waiting


class CloseHold:
    """The close-hold state and steps of a relay (:class:`._relay._Relay`, which has the
    buffers and sockets named below)."""

    plain: socket.socket
    out_view: memoryview
    out_len: int
    body_len: int
    body_got: int
    body_sent: int
    close_in_frame: bool

    def _init_hold(self, confirm: socket.socket | None) -> None:
        self.confirm = confirm
        self.held: bytes | None = None  # the close, held back
        self.held_at = self.kept_alive = 0.0  # (monotonic) since when; its last keepalive
        self.answered = False  # the daemon has its close's answer: nothing more goes to it
        self.word: bytes | None = None  # the keeper's word on the daemon's end, once read
        self.confirm_open = confirm is not None

    def _send_frame(self, data: bytes | None, n: int = 0) -> None:
        raise NotImplementedError  # the relay's

    def _hold_close(self, start: int, n: int) -> int:
        """The target's daemon sent its close (from byte ``start`` of the ``n`` read; a close
        begun in an earlier read has its rest held, the source's gate passing only whole
        requests). ``criu lazy-pages`` sends it when its loop ends, also on an error with
        pages missing, and the source's CRIU kills the original when it gets it. So it is
        held back: the daemon gets the page server's answer here (a status of 0, which its
        exit code does not depend on; what is still due to it, and what the source sends
        from now on, is dropped: it asked for nothing more), and the close goes on only once
        the keeper says the daemon exited 0 (:meth:`_judge_held`); else the relay fails, and
        the source, which never had the close, takes its original back. The bytes before
        the close, to send now."""
        self.held = bytes(self.out_view[_HEADER.size + start : _HEADER.size + n])
        self.held_at = self.kept_alive = time.monotonic()
        self.answered = True
        self.body_sent = self.body_got  # (dropped)
        if self.body_len >= 0 and self.body_got == self.body_len:
            self.body_len = -1
            self.body_got = self.body_sent = 0
        with contextlib.suppress(OSError):  # best effort: its exit code is what counts
            self.plain.send(CLOSED_STATUS)
        return start

    def _judge_held(self) -> None:
        """The close held back: on once the keeper's word is that the daemon exited 0 (and
        the frame in hand has gone); the relay fails on any other word, on the keeper's end
        without one, and after :data:`HOLD_LIMIT` seconds without one."""
        assert self.held is not None
        if self.word == DAEMON_OK:
            if not self.out_len:
                self.close_in_frame = True
                self._send_frame(self.held)  # the daemon ended well: the close goes on
                self.held = None
            return
        if self.word is not None or not self.confirm_open:
            raise ChannelError(
                "the lazy-pages daemon ended on an error after its close: its pages are not "
                "all here (the source keeps its original)"
            )
        if time.monotonic() - self.held_at >= HOLD_LIMIT:
            raise ChannelError(
                f"no word of the lazy-pages daemon's end {HOLD_LIMIT:g} s after its close "
                "(the source keeps its original)"
            )

    def _keepalive(self, idle: float | None) -> float:
        """While the close waits for the keeper's word: an empty frame to the source each
        :data:`KEEPALIVE` seconds (its relay gives up after 8 s of silence, and the word may
        come only once the keeper's restore is done); how long the select may wait."""
        now = time.monotonic()
        due = self.held_at + HOLD_LIMIT - now
        if not self.out_len:  # (a frame in hand is movement: the next select waits for it)
            if now - self.kept_alive >= KEEPALIVE:
                self.kept_alive = now
                self._send_frame(b"")
            due = min(due, self.kept_alive + KEEPALIVE - now)
        return max(0.0, due if idle is None else min(idle, due))

    def _confirmed(self) -> None:
        """Read the keeper's word on how the daemon ended (its end without one: none)."""
        assert self.confirm is not None
        try:
            word = self.confirm.recv(1)
        except BlockingIOError:
            return
        except OSError:
            word = b""
        if word:
            self.word = word
        else:
            self.confirm_open = False
