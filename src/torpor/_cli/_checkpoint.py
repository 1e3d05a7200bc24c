"""``torpor checkpoint``: dump a running process into an image."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ._app import App, human_bytes


def register(sub: Any) -> None:
    """Add the command."""
    p = sub.add_parser(
        "checkpoint",
        help="checkpoint a running process into an image",
        description="Checkpoint PID (or a managed process's NAME). A process using the torpor "
        "library runs its hooks first (a coordinated checkpoint); others get a plain CRIU dump. "
        "A failed checkpoint leaves the process running. Ctrl-C, SIGTERM or SIGHUP (or this "
        "command's death) before CRIU has written the image aborts the checkpoint and the "
        "process keeps running; after that the checkpoint completes regardless. An image that "
        "could not be finished once the process was stopped is kept: `torpor images` shows it "
        "as incomplete and `torpor image repair` finishes it.",
    )
    p.add_argument("target", metavar="PID|NAME")
    p.add_argument("-o", "--output", metavar="IMAGE", help="image directory to create")
    p.add_argument("--name", help="image name (default: the process name + time)")
    p.add_argument("--pool", help="store the image in this pool (see `torpor pool`)")
    p.add_argument("--leave-running", action="store_true", help="keep the process running")
    p.add_argument(
        "--tcp-established", action="store_true", help="dump established TCP connections"
    )
    p.add_argument("--shell-job", action="store_true", help="the process is a shell job (tty)")
    p.add_argument(
        "--no-coordinate", action="store_true", help="never run the process's hooks; plain dump"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="coordinated checkpoint timeout")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: image, pool, duration_s, frozen_ms, bytes, new_bytes, "
        "staged (memory or disk)",
    )
    p.set_defaults(handler=_checkpoint)


def _checkpoint(app: App, args: argparse.Namespace) -> int:
    import signal

    from .._process._checkpointer import CheckpointAbortedError, interruptible_by

    # SIGTERM and SIGHUP (a CI timeout, a closed terminal) do what Ctrl-C does: abort before
    # CRIU has written the image, nothing once it has (see _process._checkpointer).
    with interruptible_by((signal.SIGTERM, signal.SIGHUP)):
        try:
            return _checkpoint_now(app, args)
        except CheckpointAbortedError as exc:
            app.err(f"torpor: error: {exc}")
            return 130


def _checkpoint_now(app: App, args: argparse.Namespace) -> int:
    from .._engine import DumpOptions
    from .._images import _store
    from .._images._image import Image, check_free
    from .._images._stats import read_dump_stats_at
    from .._process import _dump, _locks, _proc, _registry
    from .._process._topool import memory_staging
    from ._run import resolve_target

    pid = resolve_target(args.target)
    # Refused before anything is asked of the process or of CRIU (see _process._dump).
    _dump.check_dumpable(_proc.ref(pid))
    managed = _registry.find_by_pid(pid)
    base = managed.name if managed else f"pid{pid}"
    name = _store.check_name(args.name or f"{base}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.output:
        dest = Path(args.output).absolute()
    elif args.pool:
        from .. import _paths

        dest = _paths.cache_dir() / f".push-{name}-{pid}"
    else:
        dest = _store.default_path(name)
    _dump.check_destination(dest)
    check_free(dest)

    image: Image | None = None
    stored: str | None = None
    frozen_ms: float | None = None
    new_bytes: int | None = None
    staged = "disk"
    started = time.perf_counter()
    # One checkpoint of a process at a time. The request lock is held from the first step (the
    # coordinated request: the process runs its hooks before its keeper takes the dump lock)
    # through a plain dump, whose checkpointer (forked by us) takes the dump lock: always in
    # that order, so two commands at once never refuse each other both.
    with _locks.requesting(_proc.ref(pid)):
        if not args.no_coordinate:
            image = _coordinated(app, pid, dest, args, name)
        if image is None and args.pool and not args.output:
            # A plain dump stages in memory when it fits (see _topool.memory_staging): the
            # process is frozen only while CRIU writes there. A coordinated one stays on disk,
            # where the app itself can make its staging directory.
            shm = memory_staging(_proc.facts(pid)[1])
            if shm is not None:
                dest = shm / f".push-{name}-{pid}"
                _dump.check_destination(dest)
                staged = "memory"
        if image is None:
            options = DumpOptions(
                leave_running=args.leave_running,
                tcp_established=args.tcp_established,
                shell_job=args.shell_job,
            )
            if args.pool:
                outcome = _dump_to_pool(app, pid, dest, options, name, args.pool)
            else:
                outcome = _dump.checkpoint(pid, dest, options, name=name)
            image = outcome.image
            stored = outcome.stored
            frozen_ms = outcome.frozen_ms
            new_bytes = outcome.new_bytes
            if outcome.interrupted:
                app.warn("interrupted once CRIU had written the image: the checkpoint completed")
            for warning in outcome.warnings:
                app.warn(warning)
            if outcome.push_error is not None:
                raise outcome.push_error  # the image is kept where it says
        else:  # coordinated: the image is here, with CRIU's stats
            stats = read_dump_stats_at(image.path)
            frozen_ms = stats.frozen_ms if stats is not None else None
    m = image.manifest
    if args.pool:
        if stored is None:  # a coordinated checkpoint: its keeper made the image, we push it
            pushed = _push(app, image, name, args.pool, pid)
            stored, new_bytes = pushed.name, pushed.stored_bytes
        elapsed = time.perf_counter() - started
        app.info(f"checkpointed pid {pid} in {elapsed:.3f}s into {name}@{args.pool}")
        if args.json:
            app.out(
                _summary(stored, args.pool, elapsed, frozen_ms, m.total_bytes, new_bytes, staged)
            )
        else:
            app.out(f"{stored}@{args.pool}")
        return 0
    elapsed = time.perf_counter() - started
    if args.json:
        app.out(_summary(str(image.path), None, elapsed, frozen_ms, m.total_bytes, None, staged))
        return 0
    app.info(
        f"checkpointed pid {pid} in {elapsed:.3f}s: {human_bytes(m.total_bytes)} "
        f"({'left running' if args.leave_running else 'process stopped'})"
    )
    app.out(str(image.path))
    return 0


def _summary(
    image: str,
    pool: str | None,
    elapsed: float,
    frozen_ms: float | None,
    total: int,
    new_bytes: int | None,
    staged: str = "disk",
) -> str:
    """The one JSON line of ``--json`` (what the supervisor records of each checkpoint)."""
    import json

    return json.dumps(
        {
            "image": image,
            "pool": pool,
            "duration_s": round(elapsed, 6),
            "frozen_ms": frozen_ms,
            "bytes": total,
            "new_bytes": new_bytes,
            "staged": staged,
        },
        sort_keys=True,
    )


def _dump_to_pool(app: App, pid: int, dest: Path, options: Any, name: str, pool_name: str) -> Any:
    """``_dump.checkpoint()`` of a ``--pool`` checkpoint: the checkpointer pushes the image
    to the pool once it has committed it (the command's death cannot stop the push, see
    ``_process._topool``); we draw the push's progress it reports."""
    import os

    from .._errors import DumpError, PermissionDeniedError
    from .._process import _dump, _proc
    from .._process._checkpointer import Job, run

    # The checks _dump.checkpoint() makes before it starts a checkpointer (it takes no pool).
    if os.geteuid() != 0:
        raise PermissionDeniedError("checkpointing needs root (CRIU)", hint="run as root")
    ttys = _dump.terminal_fds(pid)
    if ttys and not options.shell_job:
        raise DumpError(
            f"pid {pid} holds a terminal ({ttys[0]}); a terminal cannot be restored elsewhere "
            "(nothing was done)",
            pid=pid,
            hint="start it with `torpor run` (stdio to a log file), or pass --shell-job to "
            "dump and restore it as a shell job",
        )
    with app.progress(f"push {name}@{pool_name}", None) as bar:

        def told(done: int, total: int) -> None:
            bar.total = total
            bar.advance(done)

        return run(Job(_proc.ref(pid), dest, options, name, pool_name), on_progress=told)


def _push(app: App, image: Any, name: str, pool_name: str, pid: int) -> Any:
    """Store the new local ``image`` in the pool; if that fails the image is kept (in the
    local store under ``name`` if it can be) and the error says where (the process may be
    gone: it is all there is of it)."""
    from .._process._topool import push, unpushed

    try:
        with app.progress(f"push {name}@{pool_name}", image.manifest.total_bytes) as bar:
            return push(image, name, pool_name, pid, progress=bar.advance)
    except KeyboardInterrupt as exc:
        raise unpushed(image.path, name, pool_name, pid, exc) from exc


def _coordinated(app: App, pid: int, dest: Path, args: argparse.Namespace, name: str) -> Any:
    """Ask the process to checkpoint itself (its hooks run first); None if it does not use
    torpor (then the caller does a plain dump)."""
    from .._coord import NotCoordinatedError, request_checkpoint
    from .._images._image import Image

    # The caller holds the request lock (see _checkpoint_now).
    try:
        request_checkpoint(
            pid,
            dest,
            leave_running=args.leave_running,
            tcp_established=args.tcp_established,
            name=name,
            timeout=args.timeout,
        )
    except NotCoordinatedError:
        return None
    app.debug("coordinated checkpoint: the process ran its hooks")
    return Image.open(dest)
