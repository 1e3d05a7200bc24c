"""The keeper's restore path: copies of an image restored as the keeper's children.

:func:`restore` is :meth:`torpor._process._keeper.Keeper.restore` (``keeper`` is its
``self``): the image verified while CRIU restores (copies left stopped until it is known
good), one warm CRIU used for the first copy, records written at CRIU's ``post-restore`` so
that they match what runs whatever happens to the keeper, lazy-pages daemons for post-copy
memory, all or nothing across ``--count``. It uses the keeper's public face only (``pid``,
``warm``, ``spare_log``, ``adopt``, ``discard``, ``holding``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .. import _errors, _paths
from .._engine import CriuEngine, NotifyEvent, RestoreOptions
from .._errors import RestoreError, TorporError
from .._images._image import Image
from .._images._manifest import now_iso
from .._lazy import _restore as _lazy
from . import _registry
from ._keeper_children import (
    child_start_time,
    continue_tree,
    in_other_pid_ns,
    kill_unadopted,
    own_children,
)
from ._logs import open_log
from ._registry import ManagedProcess, Reservation

if TYPE_CHECKING:
    from ._keeper import Keeper


def restore(
    keeper: Keeper,
    image: Image,
    names: Sequence[str],
    options: RestoreOptions,
    *,
    verify: bool | Literal["full"],
    reuseport: bool | None = None,
    reservation: Reservation | None = None,
    stay_stopped: bool = False,
) -> list[ManagedProcess]:
    """Restore ``len(names)`` copies of ``image`` as ``keeper``'s children, a bounded number
    at a time; with ``stay_stopped`` they are left stopped (SIGSTOP'd by CRIU), for the caller
    to continue (:func:`continue_tree`): a migration's copy, run once the original's end is
    confirmed.

    Records match what runs whatever happens to the keeper (F3): with ``reservation``
    (holding ``names``), each copy's record is written, marked ``restoring``, in CRIU's
    ``post-restore`` notification, before CRIU is answered and before anything restored
    runs. A keeper killed before its answer makes CRIU abort and kill the copy (nothing
    runs, no record); one killed later leaves the record, which the command that forked
    the keeper finds (:func:`torpor._process._keeper.spawn`: ``_registry.kill_unfinished``)
    and kills the copy it names (stopped or not): a restore is all or nothing. A failed
    restore deletes them; :meth:`Keeper.record` rewrites them without the mark once
    everything runs.

    The checksums are verified while CRIU restores (on the other core). CRIU ignores a
    failing ``pre-resume`` answer, so copies are restored stopped (``leave_stopped``) and
    continued only once the image is known good: nothing from a corrupted image ever runs.
    Copies that must share a listening port (``reuseport``, see ``_copies``) are restored
    from a derived image, made only once the image is verified.
    """
    from . import _copies

    _copies.check_fits(image, len(names))
    try:
        copies = _copies.Copies(image, len(names), reuseport=reuseport)
    except _errors.ImageCorruptedError:
        if verify:  # a damaged file is reported as every restore reports it
            image.verify(full=True)
        raise
    verdict: Future[None] = Future()
    if not verify or (verify != "full" and image.trusted()):
        # Unchanged since it was hashed (or verification declined): restore right away.
        verdict.set_result(None)
    elif copies.derives:
        # Known not to be trusted (or asked for in full), and to be derived from: hash
        # everything first.
        image.verify(full=True)
        verdict.set_result(None)
    else:
        # Known not to be trusted (or asked for in full): hash everything.
        threading.Thread(target=_verify_into, args=(image, verdict), daemon=True).start()
        options = dataclasses.replace(options, leave_stopped=True)
    if stay_stopped:
        if options.lazy_pages:
            raise TorporError("a lazy restore cannot be left stopped")
        options = dataclasses.replace(options, leave_stopped=True)
    engine = CriuEngine()
    # Post-copy memory: each copy gets a lazy-pages daemon of its own, watched once it runs.
    lazies = (
        _lazy.LazyCopies.for_image(image, engine.binary, hold=keeper.holding)
        if options.lazy_pages
        else None
    )
    warm, keeper.warm = keeper.warm, None
    spare, keeper.spare_log = keeper.spare_log, None
    if warm is not None and not warm.alive():
        # CRIU started ahead of time died meanwhile (killed, OOM): restore with a fresh
        # one rather than fail the command. Its spare log went with it.
        warm.close()
        warm = None
    early: dict[int, ManagedProcess] = {}  # copy -> its record written at post-restore
    before = own_children()  # the keeper's processes (and a warm CRIU) before these copies

    def one(i: int, images_dir: Path) -> ManagedProcess:
        # Each copy writes its stdout/stderr to a log of its own, not the original's.
        log_path = _paths.logs_dir() / f"{names[i]}.log" if copies.stdio else None
        conn = warm if i == 0 else None
        log_fd = opened = None

        def copy_record(pid: int, restoring: str | None = None) -> ManagedProcess:
            return ManagedProcess(
                name=names[i],
                pid=pid,
                start_time=child_start_time(pid),
                keeper_pid=keeper.pid,
                command=image.manifest.cmdline,
                started=now_iso(),
                log_path=str(log_path) if log_path else None,
                restored_from=str(image.path),
                managed_as=_registry.managed_name(pid),
                restoring=restoring,
            )

        def noted(event: NotifyEvent) -> None:
            if event.name != "post-restore" or reservation is None or not event.pid:
                return
            early[i] = rec = copy_record(event.pid, "restored, not yet continued")
            reservation.commit(rec)  # raising makes CRIU abort (and kill the copy)

        if log_path is not None:
            # The warm CRIU holds the spare log: named as this copy's log, it can be
            # inherited there. Otherwise (a name with a log already, no spare) the log is
            # opened here, and a fresh CRIU is started with it.
            if conn is not None and spare is not None and spare.claim(log_path):
                log_fd = spare.fd
            else:
                log_fd = opened = open_log(log_path)
        try:
            own = options
            if log_fd is not None:
                inherit = {key: log_fd for key in copies.stdio}
                own = dataclasses.replace(options, inherit_fds=inherit)
            passed = (spare.fd,) if spare is not None and conn is not None else ()
            with copies.criu_turn():
                lazy = lazies.start(names[i]) if lazies is not None else None
                try:
                    res = (lazy.engine(engine) if lazy is not None else engine).restore(
                        images_dir, own, notify=noted, connection=conn, connection_fds=passed
                    )
                    if lazy is not None:
                        lazy.restored(res.pid, tasks=_lazy.restored_tasks(res.pid))
                except RestoreError as exc:
                    # Our own post-restore step failed (its record could not be written):
                    # CRIU aborted and killed the copy; that step's error says it all.
                    if isinstance(exc.__cause__, TorporError):
                        raise exc.__cause__ from None
                    raise
        finally:
            if opened is not None:
                os.close(opened)
        rec = copy_record(res.pid)
        keeper.adopt(rec)
        return rec

    try:
        with copies.images_dir() as images_dir:
            results = _copies.run_bounded(len(names), lambda i: one(i, images_dir))
    finally:
        if warm is not None:
            warm.close()
        if spare is not None:
            spare.close()  # unclaimed, it is gone with the warm CRIU's fd of it
    bad = verdict.exception()
    failures = [r for r in results if isinstance(r, BaseException)]
    restored = [r for r in results if isinstance(r, ManagedProcess)]
    if bad is not None or failures:
        # All or nothing: a partial --count is not what was asked for. The copies were
        # never recorded, and never will be (the records written at post-restore go).
        keeper.discard(restored)
        if lazies is not None:
            lazies.abort()
        ran = {r.pid for r in restored}
        for rec in early.values():
            if rec.pid not in ran:
                # CRIU died after it named the copy (killed at post-restore): the copy may
                # run on, our unreaped child (rst_sibling), unknown to anyone else.
                kill_unadopted(rec.pid)
            with contextlib.suppress(OSError, TorporError):
                _registry.delete_if(rec.name, rec.ref)
        # CRIU killed before it named a copy (before post-restore) may leave the tree it had
        # forked, our child (rst_sibling) that no one knows of: an app tree (in a PID
        # namespace of its own, unlike CRIU's processes) new since these copies began and
        # not adopted is one, and must not run on.
        for pid in own_children() - before - set(keeper.children):
            if in_other_pid_ns(pid):
                kill_unadopted(pid)
        raise bad or failures[0]
    if options.leave_stopped and not stay_stopped:
        for r in restored:
            continue_tree(r.pid)
    if lazies is not None:
        lazies.watch()
    return restored


def _verify_into(image: Image, verdict: Future[None]) -> None:
    try:
        image.verify(full=True)
    except BaseException as exc:
        verdict.set_exception(exc)
    else:
        verdict.set_result(None)
