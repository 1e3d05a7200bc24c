"""``torpor run``, ``torpor ps``, ``torpor kill``: managed processes."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

from .. import _paths
from .._errors import AlreadyExistsError, TorporError, UsageError
from ._app import App, human_duration
from ._stop import stop

if TYPE_CHECKING:
    from .._process._registry import ManagedProcess
    from .._supervise._spec import Spec

# `torpor run --resume`: a restore was attempted and failed (FastFreeze's 171 in spirit): an
# outer supervisor retrying the command can tell a bad image from a failing app, and retry
# with --no-restore.
RESTORE_FAILED = 3


def register(sub: Any) -> None:
    """Add the commands."""
    p = sub.add_parser(
        "run",
        help="start a command so it can be checkpointed and restored",
        description="Start CMD as pid 1 of its own PID namespace, a session leader with stdin on "
        "/dev/null and stdout/stderr appended to a log, so it can be checkpointed and restored "
        "cleanly, as many times as wanted. Returns once it runs.",
    )
    p.add_argument("--name", help="a name for the process (default: the command's name + pid)")
    p.add_argument("--log", help="append stdout/stderr here (default: <home>/logs/NAME.log)")
    p.add_argument("--no-log", action="store_true", help="stdout/stderr to /dev/null")
    from ._supervise import add_options

    add_options(p, interval_required=False)
    p.add_argument(
        "--resume",
        action="store_true",
        help="restore the newest checkpoint of --name from --pool if there is one, else start "
        f"CMD; exit code {RESTORE_FAILED} when a restore was attempted and failed",
    )
    p.add_argument(
        "--no-restore",
        action="store_true",
        help="with --resume: start CMD afresh even if checkpoints exist (after a failed restore)",
    )
    p.add_argument(
        "--service-address",
        action="append",
        default=[],
        metavar="ADDR/PREFIX",
        help="an address of the hosts' shared subnet that belongs to this process: brought up "
        "here (if it is not) before CMD starts, and moved with it by torpor migrate (repeatable)",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(handler=_run)

    p = sub.add_parser("ps", help="list managed processes")
    p.add_argument("-a", "--all", action="store_true", help="include ended processes")
    p.add_argument("--json", action="store_true", help="output JSON")
    p.set_defaults(handler=_ps)

    p = sub.add_parser(
        "kill",
        help="stop a managed process (SIGTERM, then SIGKILL)",
        description="Stop a managed process: SIGTERM, then SIGKILL after --timeout. An app "
        "that has no SIGTERM handler (pid 1 of its PID namespace ignores SIGTERM then) gets "
        "SIGKILL at once. Says which signal ended it.",
    )
    p.add_argument("target", metavar="NAME|PID")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds before SIGKILL")
    p.set_defaults(handler=_kill)


def _run(app: App, args: argparse.Namespace) -> int:
    from .._images._store import check_name
    from .._process import _manage
    from ._supervise import any_option, spec_from, start_supervising

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command given", hint="torpor run [--name N] -- CMD [ARGS...]")
    if (args.resume or args.no_restore) and not args.name:
        raise UsageError(
            "--resume needs --name (the process whose checkpoints to restore)",
            hint="torpor run --resume --name N -- CMD",
        )
    if args.no_restore and not args.resume:
        raise UsageError("--no-restore goes with --resume", hint="add --resume, or drop it")
    flag = any_option(args)
    if flag is not None and args.checkpoint_every is None and not args.resume:
        raise UsageError(
            f"{flag} is a supervision option: it needs --checkpoint-every",
            hint="add --checkpoint-every D (0: checkpoints only when the app asks)",
        )
    name = args.name or f"{os.path.basename(cmd[0])}-{int(time.time() * 1000) % 100000}"
    check_name(name, what="process name")
    # Checked before anything starts: a bad option starts nothing.
    spec = spec_from(args, name, tuple(cmd)) if args.checkpoint_every is not None else None
    if args.resume:
        resumed = _resume(app, args, name, spec or spec_from(args, name, tuple(cmd)))
        if resumed is not None:
            return resumed
    log: Any = False if args.no_log else (args.log or True)
    service = _service_addresses(app, args.service_address)
    # A name given is the user's: refused if taken. An automatic one is replaced instead.
    try:
        rec = _manage.run(cmd, name=name, log=log, rename_taken=not args.name)
    except BaseException:
        _take_down(service)
        raise
    app.info(f"started {rec.name} (pid {rec.pid}); log: {rec.log_path or '/dev/null'}")
    if service:
        from .._process import _registry

        texts = tuple(str(a) for a, _ in service)
        _registry.update(rec.name, rec.ref, service_addresses=texts)
    if spec is not None:
        from dataclasses import replace

        start_supervising(app, replace(spec, name=rec.name))
    app.out(f"{rec.name} {rec.pid}")
    return 0


def _service_addresses(app: App, given: list[str]) -> list[tuple[Any, bool]]:
    """``--service-address``es parsed and brought up here: each with whether it was brought
    up by us (an address the host has already is used as it is)."""
    from .._migrate import _address

    done: list[tuple[Any, bool]] = []
    try:
        for addr in _address.parse_all(given):
            if _address.held(addr) is not None:
                done.append((addr, False))
                continue
            link = _address.bring_up(addr)
            done.append((addr, True))
            _address.announce(addr, link)
            app.info(f"service address {addr} brought up on {link.name}")
    except BaseException:
        _take_down(done)
        raise
    return done


def _take_down(service: list[tuple[Any, bool]]) -> None:
    from .._migrate import _address

    for addr, ours in service:
        if ours:
            with contextlib.suppress(TorporError):
                _address.take_down(addr)


def _resume(app: App, args: argparse.Namespace, name: str, spec: Spec) -> int | None:
    """``run --resume``: restore the newest checkpoint of ``name`` (older ones when it fails
    to restore); the exit code, or None when there is none to restore (then CMD starts)."""
    from .._pools import open_pool
    from .._process import _manage
    from .._supervise import _series
    from ._restore import open_image
    from ._supervise import start_supervising

    if args.no_restore:
        return None
    with open_pool(spec.pool) as pool:
        images = [m.name for m in _series.members(pool, name)]
    if not images:
        app.info(f"no checkpoint of {name} in pool {spec.pool}: starting the command")
        return None
    newest: str | None = None  # the newest image's failure: the error line names it
    for i, image in enumerate(images):
        try:
            rec = _manage.restore(open_image(app, f"{image}@{spec.pool}"), names=[name])[0]
        except AlreadyExistsError:
            raise  # the name runs: no older image would restore either
        except TorporError as exc:
            if newest is None:
                newest = f"{image}@{spec.pool}: {exc.msg}"
            if i + 1 < len(images):
                app.warn(f"{image}@{spec.pool} did not restore ({exc.msg}); trying the one before")
            continue
        app.info(f"restored {name} from {image}@{spec.pool}")
        if args.checkpoint_every is not None:
            start_supervising(app, spec, event="resume")
        app.out(f"{rec.name} {rec.pid}")
        return 0
    # One line, as every error: the outer supervisor's log shows what to do.
    app.err(
        f"torpor: error: no checkpoint of {name} restored ({len(images)} tried; the newest, "
        f"{newest}) — run it again with --no-restore to start the command afresh"
    )
    return RESTORE_FAILED


def _journals_left() -> bool:
    """Whether killed or running migrations left journals of what to undo here (without
    importing _migrate._leftovers: it loads TLS)."""
    try:
        return bool(os.listdir(_paths.home() / _paths.MIGRATE_UNDO))
    except OSError:
        return False


def _ps(app: App, args: argparse.Namespace) -> int:
    from .._lazy import _sweep
    from .._process import _proc, _registry
    from .._supervise import _state

    _sweep.sweep_home()  # what killed keepers left of lazy restores (checked by pid)

    skipped: list[TorporError] = []
    supervised = {s.name: s for s in _state.list_all(skipped)}
    # Besides what runs, what the supervisor gave up on: a user must see that and why.
    recs = [
        r
        for r in _registry.list_all(skipped)
        if args.all or r.state == "running" or _given_up(supervised.get(r.name))
    ]
    if _journals_left():  # the home was checked above; no TLS import for a plain ps
        from .._migrate._leftovers import sweep

        for line in sweep():  # what killed migrations left here (their commands are gone)
            app.warn(line)
    for problem in skipped:
        app.warn(f"skipped: {problem}")
    if args.json:
        app.json(
            [
                {
                    **r.__dict__,
                    "state": f"migrating {r.migrating}"
                    if _migrating(r) and r.state == "running"
                    else r.state,
                    "keeper_alive": _registry.keeper_alive(r),
                    "supervision": _supervision_json(supervised.get(r.name)),
                }
                for r in recs
            ]
        )
        return 0
    # The supervision columns only when something listed is supervised: the table others
    # parse stays as it was otherwise.
    extra = any(r.name in supervised for r in recs)
    rows = []
    for r in recs:
        running = r.state == "running"
        uptime = human_duration(_proc.start_seconds_ago(r.ref)) if running else "-"
        # A running process whose keeper was killed: still torpor's (kill, checkpoint), but
        # nobody will record how it ends.
        state = "running, no keeper" if running and not _registry.keeper_alive(r) else r.state
        if running and _migrating(r):
            state = f"migrating {r.migrating}"
        origin = f"migrated-from {r.migrated_from}" if r.migrated_from else r.restored_from
        row: tuple[Any, ...] = (
            r.name,
            r.pid,
            state,
            uptime,
            " ".join(r.command)[:60],
            origin or "-",
        )
        if extra:
            row += _supervision_columns(supervised.get(r.name))
        rows.append(row)
    headers: tuple[str, ...] = ("NAME", "PID", "STATE", "UPTIME", "COMMAND", "RESTORED-FROM")
    if extra:
        headers += SUPERVISION_COLUMNS
    app.table(headers, rows)
    for r in recs:
        st = supervised.get(r.name)
        if st is not None and _given_up(st):
            app.out(f"{r.name}: given up: {st.given_up}")
    return 0


def _migrating(rec: ManagedProcess) -> bool:
    """Whether ``rec`` is marked as migrating, and (on the source) the migrate command that
    marked it still holds the process's dump lock: a ``torpor migrate`` that was killed
    leaves its mark, which is then not shown. A target's mark ("from PEER ...") stays until
    the source's verdict, or for good when the migration is in doubt."""
    from .._process import _locks

    if not rec.migrating:
        return False
    if not rec.migrating.startswith("to "):
        return True
    return _locks.holder_of(_locks._dump_file(rec.ref)) is not None


def _given_up(state: Any) -> bool:
    return state is not None and state.status == "given-up" and bool(state.given_up)


SUPERVISION_COLUMNS = ("SUPERVISED", "CHECKPOINT", "KEPT", "RESTORES", "LAST-CRASH")


def _supervision_columns(state: Any) -> tuple[str, ...]:
    """``torpor ps``'s supervision columns of a process (its state, or None)."""
    if state is None:
        return ("-", "-", "-", "-", "-")
    last = state.last_checkpoint
    age = "-" if last is None else human_duration(_age(last.time)) + " ago"
    crash = state.last_crash
    if crash is None:
        crashed = "-"
    else:
        how = (
            f"signal {crash.signal}"
            if crash.signal is not None
            else (f"exit {crash.exit_code}" if crash.exit_code is not None else "unknown")
        )
        crashed = f"{how}, {human_duration(_age(crash.time))} ago"
    return (state.status, age, str(state.kept), str(state.restores), crashed)


def _supervision_json(state: Any) -> dict[str, Any] | None:
    if state is None:
        return None
    out: dict[str, Any] = state.to_json()
    last = state.last_checkpoint
    out["last_checkpoint_age_s"] = None if last is None else round(_age(last.time), 3)
    return out


def _age(iso: str) -> float:
    """Seconds since the ISO time ``iso`` (0 if it cannot be read)."""
    from datetime import UTC, datetime

    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - then).total_seconds())


def resolve_target(target: str) -> int:
    """A pid from ``NAME|PID``. A managed name must be running, and be the very process torpor
    started (its record is checked against the live process: a stale or planted one is
    refused)."""
    from .._process import _registry

    if target.isdigit():
        return int(target)
    rec = _registry.load(target)
    _registry.check_live(rec)
    return rec.pid


def _kill(app: App, args: argparse.Namespace) -> int:
    from .._process import _registry

    if args.target.isdigit():
        managed = _registry.find_by_pid(int(args.target))
        if managed is None:
            raise UsageError(
                f"pid {args.target} is not a managed process",
                hint="torpor kill only stops what torpor started",
            )
    else:
        managed = _registry.load(args.target)
    pidfd = _registry.open_checked(managed)
    try:
        how = stop(pidfd, managed, args.timeout)
    finally:
        os.close(pidfd)
    app.info(f"stopped {managed.name} (pid {managed.pid}) with {how}")
    _release_addresses(app, managed)
    return 0


def _release_addresses(app: App, rec: ManagedProcess) -> None:
    """Take down the service addresses of the ended ``rec`` (``run --service-address``),
    but not one another running managed process also has."""
    if not rec.service_addresses:
        return
    from .._migrate import _address
    from .._process import _registry

    others = {
        a
        for r in _registry.list_all([])
        if r.name != rec.name and r.state == "running"
        for a in r.service_addresses
    }
    for text in rec.service_addresses:
        if text in others:
            continue
        try:
            if _address.take_down(_address.parse(text)):
                app.info(f"service address {text} taken down")
        except TorporError as exc:
            app.info(f"warning: service address {text} could not be taken down: {exc.msg}")
