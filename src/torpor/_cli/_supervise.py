"""``torpor stop``, ``supervise``, ``unsupervise``, ``resume``, ``supervisor``: supervision.

A supervised process is checkpointed every interval into a series of pool images and restored
from the newest one that works when it crashes, by this home's supervisor daemon (see
``torpor._supervise._daemon``). These commands write the supervision record and tell the
daemon (starting it when none runs); the daemon does the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import TYPE_CHECKING, Any

from .._errors import NotFoundError, ProcessNotFoundError, TorporError, UsageError
from ._app import App
from ._stop import stop as stop_process

if TYPE_CHECKING:
    from .._supervise._spec import Spec
    from .._supervise._state import State

RESUME_WAIT = 30.0  # seconds `torpor resume` waits for the daemon to bring a process back

# the options besides --checkpoint-every: flag, metavar, help
_OPTIONS = (
    ("--keep", "K", "keep the newest K checkpoints (default 3)"),
    ("--pool", "P", "pool of the checkpoints (default: default)"),
    ("--restart", "POLICY", "on-failure (default), always or no"),
    ("--success-exit-codes", "C,C", "exit codes that are not failures (default 0)"),
    (
        "--min-uptime",
        "D",
        "a restored copy failing sooner falls back to an older checkpoint (default 1s)",
    ),
    ("--max-restarts", "N", "give up after N restores within --restart-window (default 5)"),
    ("--restart-window", "D", "window of --max-restarts (default 5m)"),
)


def add_options(p: argparse.ArgumentParser, *, interval_required: bool) -> None:
    """The supervision options (``torpor run`` and ``torpor supervise``)."""
    p.add_argument(
        "--checkpoint-every",
        metavar="D",
        required=interval_required,
        help="checkpoint every D (500ms, 10s, 5m; 0: only when the app asks) and restore the "
        "newest checkpoint when it crashes",
    )
    for flag, metavar, text in _OPTIONS:
        p.add_argument(flag, metavar=metavar, help=text)
    p.add_argument(
        "--tcp-established", action="store_true", help="checkpoint established TCP connections"
    )


# Spec field -> the flag that sets it
_FLAGS = {
    "interval": "--checkpoint-every",
    "pool": "--pool",
    "keep": "--keep",
    "restart": "--restart",
    "success_exit_codes": "--success-exit-codes",
    "min_uptime": "--min-uptime",
    "restart_window": "--restart-window",
    "max_restarts": "--max-restarts",
}


def spec_from(args: argparse.Namespace, name: str, command: tuple[str, ...]) -> Spec:
    """The spec the options in ``args`` ask for (each bad one: a one-line UsageError naming
    its flag); its pool must exist (a typo would start an app nobody supervises)."""
    from .._pools import open_pool
    from .._supervise._spec import Spec

    values: dict[str, Any] = {"name": name, "command": command}
    if args.checkpoint_every is not None:
        values["interval"] = _duration(args.checkpoint_every, "--checkpoint-every")
    if args.pool is not None:
        values["pool"] = args.pool
    if args.keep is not None:
        values["keep"] = _int(args.keep, "--keep")
    if args.restart is not None:
        values["restart"] = args.restart
    if args.success_exit_codes is not None:
        codes = [c.strip() for c in args.success_exit_codes.split(",")]
        values["success_exit_codes"] = tuple(_int(c, "--success-exit-codes") for c in codes)
    for attr, key in (("min_uptime", "min_uptime"), ("restart_window", "restart_window")):
        if getattr(args, attr) is not None:
            values[key] = _duration(getattr(args, attr), "--" + attr.replace("_", "-"))
    if args.max_restarts is not None:
        values["max_restarts"] = _int(args.max_restarts, "--max-restarts")
    values["tcp_established"] = bool(args.tcp_established)
    try:
        spec = Spec(**values)
    except UsageError as exc:
        # The spec names its field ("bad supervision setting keep: ..."): the user typed a flag.
        for field, flag in _FLAGS.items():
            prefix = f"bad supervision setting {field}:"
            if exc.msg.startswith(prefix):
                raise UsageError(f"{flag}{exc.msg[len(prefix) :]}", hint=exc.hint) from None
        raise
    with open_pool(spec.pool):
        pass  # NotFoundError naming the pool, before anything starts
    return spec


def _duration(text: str, flag: str) -> float:
    from .._supervise._spec import parse_duration

    try:
        return parse_duration(text)
    except UsageError as exc:
        raise UsageError(f"{flag}: {exc.msg}", hint=exc.hint) from None


def any_option(args: argparse.Namespace) -> str | None:
    """The first supervision option given (other than --checkpoint-every), if any."""
    for flag, _, _ in _OPTIONS:
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            return flag
    return "--tcp-established" if args.tcp_established else None


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a whole number", hint=f"e.g. {flag} 3") from None


def register(sub: Any) -> None:
    """Add the commands."""
    p = sub.add_parser(
        "stop",
        help="stop a managed process (SIGTERM, then SIGKILL), supervised or not",
        description="End a managed process: SIGTERM, then SIGKILL after --timeout; says which "
        "happened. A supervised one is marked stopped first, so its supervisor does not "
        "restore it; --checkpoint takes a final checkpoint into its series before (`torpor run "
        "--resume` continues from there).",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--checkpoint", action="store_true", help="take a final checkpoint first")
    p.add_argument("--timeout", type=float, default=None, help="seconds before SIGKILL")
    p.set_defaults(handler=_stop)

    p = sub.add_parser(
        "supervise",
        help="checkpoint a running managed process periodically and restore it on a crash",
    )
    p.add_argument("name", metavar="NAME")
    add_options(p, interval_required=True)
    p.set_defaults(handler=_supervise)

    p = sub.add_parser("unsupervise", help="stop supervising a process (it keeps running)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=_unsupervise)

    p = sub.add_parser(
        "resume",
        help="bring supervised processes back from their newest checkpoints",
        description="NAME: resume the supervision of NAME here (restored from its newest "
        "checkpoint if it is not running). NAME@POOL: take over NAME from another home through "
        "a shared pool (its spec is read from the pool; refused while that home's supervisor "
        "holds the lease, unless --force). --all: every process whose record says it should "
        "run (also run by `torpor agent start`).",
    )
    p.add_argument("target", nargs="?", metavar="NAME|NAME@POOL")
    p.add_argument("--all", action="store_true", help="every supervised process")
    p.add_argument(
        "--force",
        action="store_true",
        help="take the lease even if held: two live copies may run if the other home is alive",
    )
    p.set_defaults(handler=_resume)

    p = sub.add_parser("supervisor", help="the supervisor daemon: run|status|stop")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    run = verbs.add_parser("run", help="run it in the foreground (systemd)")
    run.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument(
        "--shutdown-timeout",
        default="30s",
        metavar="D",
        help="on SIGTERM, wait at most D for the final checkpoints (default 30s)",
    )
    run.set_defaults(handler=_supervisor_run)
    status = verbs.add_parser("status", help="whether it runs, and what it supervises")
    status.add_argument("--json", action="store_true", help="output JSON")
    status.set_defaults(handler=_supervisor_status)
    stop = verbs.add_parser("stop", help="stop it (it checkpoints first; the apps keep running)")
    stop.set_defaults(handler=_supervisor_stop)


# -- supervise / unsupervise ------------------------------------------------------------------


def start_supervising(app: App, spec: Spec, *, event: str = "supervise") -> None:
    """Write ``spec`` as the supervision record (status supervised) and make the daemon
    supervise it (started when none runs)."""
    from .._supervise import _control, _events, _state

    old = _state.read(spec.name)
    state = _state.State(spec=spec, status="supervised")
    if old is not None:  # counters and history stay
        state = old.evolve(spec=spec, status="supervised", given_up=None)
    _state.save(state)
    _events.append(spec.name, event, interval_s=spec.interval, pool=spec.pool, keep=spec.keep)
    st, started = _control.ensure()
    app.info(f"supervisor {'started' if started else 'running'} (pid {st.pid})")


def _supervise(app: App, args: argparse.Namespace) -> int:
    from .._process import _registry
    from .._supervise._control import need_root

    need_root("torpor supervise")
    rec = _registry.load(args.name)
    _registry.check_live(rec)
    spec = spec_from(args, rec.name, tuple(rec.command))
    start_supervising(app, spec)
    app.out(f"supervising {rec.name} (pid {rec.pid}): {_describe(spec)}")
    return 0


def _describe(spec: Spec) -> str:
    from .._supervise._spec import format_duration

    every = (
        f"a checkpoint every {format_duration(spec.interval)}"
        if spec.interval
        else "checkpoints when the app asks"
    )
    return f"{every} into pool {spec.pool}, keeping {spec.keep}; restart {spec.restart}"


def _unsupervise(app: App, args: argparse.Namespace) -> int:
    from .._supervise import _control, _events, _state

    if _state.read(args.name) is None:
        raise NotFoundError(
            f"{args.name!r} is not supervised", hint="`torpor ps` lists supervised processes"
        )
    _state.remove(args.name)
    _events.append(args.name, "unsupervise")
    _control.reload()
    app.out(f"no longer supervising {args.name} (it keeps running; its checkpoints stay)")
    return 0


# -- stop -------------------------------------------------------------------------------------


def _stop(app: App, args: argparse.Namespace) -> int:
    import os

    from .._process import _registry
    from .._supervise import _control, _events, _state

    state = _state.read(args.name)
    rec = _registry.load(args.name)
    if args.checkpoint and state is None:
        raise UsageError(
            f"{args.name!r} is not supervised: it has no series to checkpoint into",
            hint=f"torpor checkpoint {args.name} --pool P, then torpor kill {args.name}",
        )
    pidfd = _registry.open_checked(rec)
    try:
        if state is not None:
            # First: its supervisor must not restore what is being stopped.
            _state.update(args.name, lambda s: s.evolve(status="stopped"))
            _control.reload()
            if args.checkpoint:
                try:
                    image = final_checkpoint(app, state.spec)
                except TorporError:
                    # Not stopped after all: it runs on, supervised as before.
                    _state.update(args.name, lambda s: s.evolve(status=state.status))
                    _control.reload()
                    raise
                app.info(f"checkpointed {args.name} into {image}@{state.spec.pool}")
        timeout = args.timeout
        if timeout is None:
            timeout = state.spec.stop_timeout if state is not None else 5.0
        how = stop_process(pidfd, rec, timeout)
    finally:
        os.close(pidfd)
    if state is not None:
        _events.append(args.name, "stop", how=how)
    app.out(f"stopped {rec.name} (pid {rec.pid}) with {how}")
    return 0


def final_checkpoint(app: App, spec: Spec) -> str:
    """Checkpoint ``spec.name`` into its series (the CLI, as the supervisor does); the image.
    A periodic checkpoint of the supervisor running at that moment wins the process's lock:
    retried for a few seconds."""
    import subprocess

    from .._pools import open_pool
    from .._supervise import _series
    from .._supervise._watch import cli_argv

    deadline = time.monotonic() + 10.0
    while True:
        with open_pool(spec.pool) as pool:
            image = _series.series_name(spec.name, _series.next_seq(pool, spec.name))
        argv = [*cli_argv(), "checkpoint", spec.name, "--leave-running", "--pool", spec.pool]
        argv += ["--name", image]
        if spec.tcp_established:
            argv.append("--tcp-established")
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode == 0:
            return image
        if time.monotonic() > deadline:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()] or ["no detail"]
            raise TorporError(
                f"the final checkpoint of {spec.name} failed: "
                f"{lines[-1].removeprefix('torpor: error: ')}",
                hint="stop it without --checkpoint, or retry",
            )
        time.sleep(0.5)


# -- resume -----------------------------------------------------------------------------------


def _resume(app: App, args: argparse.Namespace) -> int:
    from .._supervise._control import need_root

    need_root("torpor resume")
    if args.all == (args.target is not None):
        raise UsageError(
            "name what to resume: NAME, NAME@POOL or --all (one of them)",
            hint="torpor resume --all",
        )
    if args.all:
        return resume_all(app)
    if "@" in args.target:
        name, pool = args.target.rsplit("@", 1)
        return _resume_from_pool(app, name, pool, force=args.force)
    return _resume_names(app, [args.target])


def resume_all(app: App) -> int:
    """Resume every process whose supervision record says it should run (status
    supervised or shutdown); 0 when all run, 1 otherwise."""
    from .._supervise import _state

    skipped: list[TorporError] = []
    names = [s.name for s in _state.list_all(skipped) if s.status in ("supervised", "shutdown")]
    for problem in skipped:
        app.warn(f"skipped: {problem}")
    if not names:
        return 0  # silent: `torpor agent start` runs this every time
    return _resume_names(app, names)


def _resume_names(app: App, names: list[str]) -> int:
    from .._supervise import _control, _events, _state

    for name in names:
        state = _state.read(name)
        if state is None:
            raise NotFoundError(
                f"{name!r} is not supervised here",
                hint=f"torpor resume {name}@POOL takes it over from a pool",
            )
        if state.status != "supervised":
            _state.update(name, lambda s: s.evolve(status="supervised", given_up=None))
        _events.append(name, "resume")
    _control.ensure()
    return _wait_running(app, names)


def _wait_running(app: App, names: list[str]) -> int:
    """Wait until the supervisor has each of ``names`` running (or gave up on it)."""
    from .._process import _registry
    from .._supervise import _state

    deadline = time.monotonic() + RESUME_WAIT
    pending = list(names)
    failed = 0
    while pending:
        for name in list(pending):
            state = _state.read(name)
            if state is not None and state.status == "given-up":
                app.err(f"torpor: error: {name} not resumed: {state.given_up}")
                pending.remove(name)
                failed += 1
                continue
            try:
                rec = _registry.load(name)
            except TorporError:
                continue
            if rec.state == "running" and state is not None and state.status == "supervised":
                app.out(f"{name} {rec.pid}")
                pending.remove(name)
        if pending and time.monotonic() > deadline:
            for name in pending:
                app.err(
                    f"torpor: error: {name} is not running {RESUME_WAIT:.0f}s after the resume "
                    f"(see `torpor events {name}`)"
                )
            return 1
        if pending:
            time.sleep(0.02)
    return 1 if failed else 0


def _resume_from_pool(app: App, name: str, pool_name: str, *, force: bool) -> int:
    from .._pools import open_pool
    from .._process import _registry
    from .._supervise import _series

    with contextlib.suppress(ProcessNotFoundError):
        if _registry.load(name).state == "running":
            raise UsageError(
                f"a managed process named {name!r} already runs here",
                hint=f"torpor resume {name} resumes its supervision",
            )
    with open_pool(pool_name) as pool:
        spec = _series.read_spec(pool, name)
        if spec is None:
            raise NotFoundError(
                f"pool {pool_name!r} has no supervision spec for {name!r}",
                hint=f"`torpor images --pool {pool_name}` lists its images",
            )
        _take_lease(app, pool, name, force=force)
    from dataclasses import replace

    start_supervising(app, replace(spec, pool=pool_name), event="resume")
    return _wait_running(app, [name])


def _take_lease(app: App, pool: Any, name: str, *, force: bool) -> None:
    """Refuse while another home's supervisor holds the lease on ``name`` (LeaseHeldError);
    with ``force``, break it. Our supervisor takes it once it supervises."""
    import os

    try:
        from .._supervise import _lease
    except ImportError:  # pragma: no cover - until the lease module lands
        return
    lease = _lease.acquire(pool, name, holder=f"torpor resume (pid {os.getpid()})", force=force)
    if force:
        app.warn(f"took the lease on {name} by force: two copies run if its other home still runs")
    lease.release()


# -- supervisor -------------------------------------------------------------------------------


def _supervisor_run(app: App, args: argparse.Namespace) -> int:
    from .._supervise import _control
    from .._supervise._spec import parse_duration

    _control.need_root("torpor supervisor run")
    _control.serve(args.ready_fd, parse_duration(args.shutdown_timeout))
    return 0


def _supervisor_status(app: App, args: argparse.Namespace) -> int:
    from .._supervise import _control, _state

    st = _control.status()
    states = _state.list_all()
    if args.json:
        app.json(
            {
                "running": st.running,
                "pid": st.pid,
                "started": st.started,
                "log": str(st.log),
                "supervised": [s.to_json() for s in states],
            }
        )
    elif st.running:
        app.out(f"supervisor running (pid {st.pid}, since {st.started}); log: {st.log}")
        for s in states:
            app.out(f"  {s.name}: {s.status}" + (f" ({s.given_up})" if s.given_up else ""))
    else:
        app.out("supervisor not running")
    return 0 if st.running else 3


def _supervisor_stop(app: App, args: argparse.Namespace) -> int:
    from .._supervise import _control

    st = _control.stop()
    app.out("no supervisor was running" if st is None else f"supervisor stopped (pid {st.pid})")
    return 0


def describe_state(state: State) -> dict[str, Any]:
    """What ``torpor ps --json`` says of a supervised process."""
    return state.to_json()
