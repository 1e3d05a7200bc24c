"""The fault-injection harness: runs the real torpor CLI on a counter app in a private home
and SIGKILLs the CLI, the app's keeper, CRIU, the detached checkpointer or an agent worker at
chosen moments of a command.

A moment is a trigger (the command started, CRIU appeared, the staging directory appeared, it
holds pages, it holds the manifest, CRIU killed the app, the image is in place, a keeper or a
restored process or a record appeared, the pool got a file) plus a seeded random delay.
Victims are found as descendants of the processes the test started (see :mod:`.procs`), never
by name.

Every run is described in one line (:attr:`Outcome.story`) that, with the scenario's seed,
reproduces it.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import procs
from .procs import Ref, Tree

APPS = Path(__file__).parent / "apps"
COUNTER = APPS / "counter.py"
PYTHON = sys.executable
LAUNCHER = str(Path(sys.executable).parent / "torpor")
STAGING_MARK = ".partial-"
TICK = 0.02  # the counter app's period, seconds

# How many iterations each scenario runs (CI: the default; more locally on request).
ITERATIONS = int(os.environ.get("TORPOR_FAULT_ITERATIONS", "6"))
# pytest-timeout's bound for one scenario: ~3 s an iteration at most, with room.
TIMEOUT = 120 + 10 * ITERATIONS
BASE_SEED = os.environ.get("TORPOR_FAULT_SEED") or str(random.SystemRandom().randrange(1 << 32))


def scenario_rng(scenario: str) -> tuple[random.Random, str]:
    """The seeded generator of one scenario, and how to reproduce it."""
    seed = zlib.crc32(f"{BASE_SEED}:{scenario}".encode())
    repro = f"TORPOR_FAULT_SEED={BASE_SEED} TORPOR_FAULT_ITERATIONS={ITERATIONS}"
    return random.Random(seed), repro


@dataclass(frozen=True)
class Fault:
    """SIGKILL ``victim`` ``delay`` seconds after ``trigger`` happened."""

    trigger: str
    delay: float
    victim: str

    def __str__(self) -> str:
        return f"SIGKILL {self.victim} at {self.trigger}+{self.delay * 1000:.0f}ms"


@dataclass
class Outcome:
    """How one command ended."""

    args: tuple[str, ...]
    rc: int | None
    stdout: str
    stderr: str
    fault: Fault | None = None
    fired: str | None = None  # what was killed and when, None if the fault never fired
    elapsed: float = 0.0

    @property
    def killed(self) -> bool:
        """Whether the CLI process itself was killed (then its output is whatever it got to)."""
        return self.rc is not None and self.rc < 0

    @property
    def story(self) -> str:
        """One line: the command, the fault, what happened."""
        what = f"`torpor {' '.join(self.args)}`"
        # On one line whatever the error was (a story is one line of the report).
        error = " / ".join(self.stderr.strip().splitlines())
        said = f" ({error})" if self.rc not in (0, None) and not self.killed else ""
        if self.fault is None:
            return f"{what} -> rc {self.rc}{said}"
        fired = self.fired or "never fired (the command ended first)"
        return f"{what} with {self.fault}: {fired}; rc {self.rc}{said} after {self.elapsed:.3f}s"


@dataclass
class App:
    """A counter app started with ``torpor run``."""

    name: str
    ref: Ref
    keeper: Ref | None


@dataclass
class Lab:
    """One test's world: a private TORPOR_HOME, the process tree, the CLI to run."""

    tree: Tree
    home: Path
    tmp: Path
    scenario: str
    cli_prefix: tuple[str, ...] = (PYTHON, "-m", "torpor")
    use_agent: bool = False  # commands go through the launcher to this home's agent
    agent: Ref | None = None
    log: list[str] = field(default_factory=list)
    can_repair: bool | None = None  # whether this torpor has `torpor image repair`

    @property
    def env(self) -> dict[str, str]:
        """The CLI's environment: the lab's home; no agent unless this lab started one."""
        env = dict(os.environ, TORPOR_HOME=str(self.home))
        env.pop("TORPOR_DEBUG", None)
        env["TORPOR_AGENT"] = "on" if self.use_agent else "off"
        return env

    @property
    def state_file(self) -> Path:
        """Where every counter app of this lab appends ``<host pid> <count>`` lines."""
        return self.tmp / "counts"

    def note(self, line: str) -> None:
        """Keep ``line`` for the failure report (and print it: pytest shows it on failure)."""
        self.log.append(line)
        print(line)

    # -- running the CLI -------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 90) -> Outcome:
        """Run ``torpor ARGS`` to its end, no fault."""
        return self.run(args, None, timeout=timeout)

    def run(
        self,
        args: Sequence[str],
        fault: Fault | None,
        *,
        keeper: Ref | None = None,
        target: Ref | None = None,
        watch: Sequence[Path] = (),
        timeout: float = 90,
    ) -> Outcome:
        """Run ``torpor ARGS``, injecting ``fault`` (see :class:`Injector`); ``keeper`` and
        ``target`` are the app's keeper and the app, if the command is about one."""
        before = {r.pid for r in self.tree.mine()}
        started = time.monotonic()
        argv = (*self.cli_prefix, *args)
        proc = self.tree.spawn(argv, self.env)
        fired: str | None = None
        try:
            if fault is not None:
                injector = Injector(
                    self, proc.pid, argv, fault, before, (keeper, target), watch, started
                )
                fired = injector.drive(proc.poll, timeout)
            out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
        except BaseException:
            proc.kill()
            raise
        finally:
            self.tree.forget(proc)
        outcome = Outcome(
            tuple(args), proc.returncode, out, err, fault, fired, time.monotonic() - started
        )
        if fault is not None:
            self.note(f"  {outcome.story}")
        return outcome

    def ok(self, *args: str, timeout: float = 90) -> str:
        """``torpor ARGS`` must succeed (its errors, if any, checked); its stdout."""
        from .invariants import check_output

        out = self.cli(*args, timeout=timeout)
        check_output(self, out)
        assert out.rc == 0, self.fail(f"`torpor {' '.join(args)}` failed: {out.stderr.strip()}")
        return out.stdout

    def fail(self, what: str) -> str:
        """An assertion message: ``what``, and the iteration's story so far."""
        return "\n".join([what, *self.log[-12:]])

    # -- the counter app -------------------------------------------------------------------

    def start_app(self, name: str) -> App:
        """``torpor run`` a counter app and wait until it counts."""
        out = self.ok("run", "--name", name, "--no-log", "--", *self.app_argv())
        pid = int(out.split()[1])
        r = procs.ref(pid)
        assert r is not None, self.fail(f"{name} (pid {pid}) ended at once")
        assert procs.wait_until(lambda: len(self.counts().get(pid, [])) >= 3, 10), self.fail(
            f"{name} (pid {pid}) does not count"
        )
        st = procs.stat(pid)
        return App(name, r, procs.ref(st.ppid) if st is not None else None)

    def app_argv(self) -> list[str]:
        """The counter app's command line (its state file path marks it as this lab's)."""
        return [PYTHON, str(COUNTER), str(self.state_file), str(TICK)]

    def is_app(self, pid: int) -> bool:
        """Whether ``pid`` is one of this lab's counter apps (its argv, restored or not)."""
        return procs.cmdline(pid)[1:3] == (str(COUNTER), str(self.state_file))

    def counts(self) -> dict[int, list[int]]:
        """Host pid -> the counts it appended, in order."""
        out: dict[int, list[int]] = {}
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                out.setdefault(int(parts[0]), []).append(int(parts[1]))
        return out

    def last_count(self, pid: int) -> int:
        """The last count ``pid`` wrote (0: none)."""
        seen = self.counts().get(pid, [])
        return seen[-1] if seen else 0

    def apps(self) -> list[Ref]:
        """Every live counter app of this lab."""
        return [r for r in self.tree.mine() if self.is_app(r.pid)]

    # -- records, images -------------------------------------------------------------------

    def ps(self) -> list[dict[str, Any]]:
        """``torpor ps -a --json``, which must succeed."""
        rows = json.loads(self.ok("ps", "-a", "--json"))
        assert isinstance(rows, list), rows
        return rows

    def settle(self, timeout: float = 20) -> list[str]:
        """Wait until what the command left behind has finished (CRIU, finalisers, keepers
        without apps); the processes still at it after ``timeout``, described."""

        def transient() -> list[Ref]:
            mine = self.tree.mine()
            busy = []
            for r in mine:
                if self.agent is not None and self.agent_own(r):
                    continue
                if self.is_app(r.pid):
                    continue
                if any(self.is_app(k) for k in procs.children(r.pid)):
                    continue  # a keeper of a live app
                busy.append(r)
            return busy

        # Judged on one look: a process seen busy (an app dying leaves an empty cmdline for a
        # moment, then a zombie) is looked at again until none is, or the time is up.
        deadline = time.monotonic() + timeout
        busy = transient()
        while busy and time.monotonic() < deadline:
            time.sleep(0.02)
            busy = transient()
        return [
            f"pid {r.pid} ({r.state()}) {' '.join(procs.cmdline(r.pid))[:120] or '-'}" for r in busy
        ]

    def agent_own(self, r: Ref) -> bool:
        """The agent master, an idle worker, or an idle worker's pre-started CRIU."""
        assert self.agent is not None
        if r == self.agent:
            return True
        st = procs.stat(r.pid)
        if st is None:
            return False
        if st.ppid == self.agent.pid:
            return True
        parent = procs.stat(st.ppid)
        return parent is not None and parent.ppid == self.agent.pid and procs.is_criu(r.pid)

    def cleanup(self) -> None:
        """Kill every process of this iteration (the agent and its workers stay)."""
        agent = self.agent

        def keep(r: Ref) -> bool:
            if agent is None or not agent.alive():
                return False
            return self.agent_own(r) and not self.is_app(r.pid) and not self.keeps_app(r)

        left = self.tree.kill_all(keep)
        assert not left, f"processes outlived SIGKILL: {left}"

    def keeps_app(self, r: Ref) -> bool:
        """Whether ``r`` is the parent of a live app (its keeper)."""
        return any(self.is_app(k) for k in procs.children(r.pid))


class Injector:
    """Watches one command and fires its fault."""

    def __init__(
        self,
        lab: Lab,
        cli_pid: int,
        argv: Sequence[str],
        fault: Fault,
        before: set[int],
        app: tuple[Ref | None, Ref | None],
        watch: Sequence[Path],
        started: float,
    ) -> None:
        self.lab = lab
        self.cli = procs.ref(cli_pid)
        self.fault = fault
        self.before = before
        self.keeper, self.target = app  # the app's keeper, and the app
        self.watch = [*watch, lab.home / "images", lab.home / "cache"]
        self.started = started
        # Its argv as given, not as /proc shows it: just after a vfork+exec it may be empty.
        self.prefix = tuple(argv)
        self.agent_argv = procs.cmdline(lab.agent.pid) if lab.agent is not None else ()
        self.images_before = self.images_now()
        self.pool_files = self.pool_files_now()
        self.records_before = self.records_now()
        # The launcher's stdout: the agent worker serving it holds the same pipe.
        self.pipe = _fd1(cli_pid)

    def drive(self, done: Callable[[], int | None], timeout: float) -> str | None:
        """Poll until the trigger, wait the delay, kill; what was killed (None: the command,
        and whatever it started that the victim names, ended before the fault could fire)."""
        deadline = self.started + timeout
        triggered: float | None = None
        check = TRIGGERS[self.fault.trigger]
        while time.monotonic() < deadline:
            now = time.monotonic()
            if triggered is None and check(self):
                triggered = now
            if triggered is not None and now - triggered >= self.fault.delay:
                sent = [v for v in self.victims() if procs.signal_ref(v)]
                if sent:
                    pids = ", ".join(str(v.pid) for v in sent)
                    return f"killed {self.fault.victim} (pid {pids}) at {now - self.started:.3f}s"
            if done() is not None and self.fault.victim == "cli":
                return None
            if done() is not None and not (self.victims() if triggered else self.busy()):
                return None  # the command is over, and so is what the fault could hit
            time.sleep(0.002)
        return None

    def busy(self) -> bool:
        """Whether something the command started still works (CRIU, a detached finaliser or
        keeper without an app yet, the agent worker serving it)."""
        forks = self.forks()
        for r in self.new():
            if self.lab.agent is not None and self.lab.agent_own(r):
                continue  # a spare worker the master started meanwhile, and its CRIU
            if procs.is_criu(r.pid):
                return True
            if r in forks and not self.lab.keeps_app(r):
                return True
        return bool(self.workers())

    # -- victims ---------------------------------------------------------------------------

    def victims(self) -> list[Ref]:
        """The processes the fault's victim names, now."""
        return self.victims_of(self.fault.victim)

    def victims_of(self, kind: str) -> list[Ref]:
        """The processes ``kind`` (cli, criu, keeper, checkpointer, worker) names, now."""
        if kind == "cli":
            return [self.cli] if self.cli is not None and self.cli.alive() else []
        if kind == "criu":
            agent = self.lab.agent
            spawned = [
                r
                for r in self.new()
                if procs.is_criu(r.pid) and not (agent is not None and self.lab.agent_own(r))
            ]
            return spawned + self.worker_criu()
        if kind == "keeper":
            if self.keeper is not None:
                return [self.keeper] if self.keeper.alive() else []
            if self.lab.agent is not None:
                return self.workers()
            return self.forks()
        if kind == "checkpointer":
            return [r for r in self.forks() if not self.lab.keeps_app(r)]
        if kind == "worker":
            return self.workers()
        raise AssertionError(f"unknown victim {kind}")

    def forks(self) -> list[Ref]:
        """New forks of the command (a restore's keeper, a detached checkpointer): the same
        argv as the CLI, or, through an agent, as its master (but not the master's children,
        its workers)."""
        agent = self.lab.agent
        out = []
        for r in self.new():
            if r == self.cli or procs.is_criu(r.pid) or self.lab.is_app(r.pid):
                continue
            if agent is None:
                if _same_program(r.pid, self.prefix):
                    out.append(r)
                continue
            st = procs.stat(r.pid)
            if st is not None and st.ppid != agent.pid and _same_program(r.pid, self.agent_argv):
                out.append(r)
        return out

    def new(self) -> list[Ref]:
        """The test's processes that were not there when the command started."""
        return [r for r in self.lab.tree.mine() if r.pid not in self.before]

    def workers(self) -> list[Ref]:
        """The agent worker serving this command: a child of the master holding the
        launcher's stdout pipe."""
        agent = self.lab.agent
        if agent is None or self.pipe is None:
            return []
        out = []
        for kid in procs.children(agent.pid):
            r = procs.ref(kid)
            if r is not None and self.pipe in procs.fd_targets(kid):
                out.append(r)
        return out

    def worker_criu(self) -> list[Ref]:
        """CRIU started by the serving worker (in an agent, ahead of time)."""
        out = []
        for w in self.workers():
            for kid in procs.children(w.pid):
                r = procs.ref(kid)
                if r is not None and procs.is_criu(kid):
                    out.append(r)
        return out

    # -- what the command has done so far --------------------------------------------------

    def staging_dirs(self) -> list[Path]:
        """Staging directories (``.NAME.partial-*``, ``.push-*``) in the watched places."""
        out: list[Path] = []
        for d in self.watch:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            out.extend(d / n for n in names if STAGING_MARK in n or n.startswith(".push-"))
        return out

    def staged(self, pred: Callable[[str], bool]) -> bool:
        """Whether a staging directory holds a file ``pred`` likes."""
        for d in self.staging_dirs():
            try:
                if any(pred(n) for n in os.listdir(d)):
                    return True
            except OSError:
                continue
        return False

    def images_now(self) -> set[Path]:
        """The image directories (holding a manifest) in the watched places."""
        out: set[Path] = set()
        for d in self.watch:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            out.update(d / n for n in names if os.path.exists(d / n / "torpor.json"))
        return out

    def image_in_place(self) -> bool:
        """An image directory (or a staging directory holding its manifest) appeared in a
        watched place since the command started."""
        made = {p for p in self.images_now() if not p.name.startswith(".")}
        return bool(made - self.images_before)

    def pool_files_now(self) -> int:
        """How many files the home's pools hold."""
        n = 0
        for _root, _dirs, files in os.walk(self.lab.home / "pools"):
            n += len(files)
        return n

    def records_now(self) -> set[str]:
        """The record files of the home."""
        try:
            return set(os.listdir(self.lab.home / "procs"))
        except OSError:
            return set()


def _fd1(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/1")
    except OSError:
        return None


def _same_program(pid: int, prefix: Sequence[str]) -> bool:
    """A fork of the CLI (a keeper, a finaliser): the same argv."""
    return bool(prefix) and procs.cmdline(pid) == tuple(prefix)


TRIGGERS: dict[str, Callable[[Injector], bool]] = {
    "start": lambda i: True,
    # The app ended: CRIU killed it once the image was written; the commit is still to come.
    "app-gone": lambda i: i.target is not None and not i.target.alive(),
    # CRIU at work (`criu swrk`), not a `criu --version` probe.
    "criu": lambda i: any("swrk" in procs.cmdline(r.pid) for r in i.victims_of("criu")),
    "staging": lambda i: bool(i.staging_dirs()),
    "pages": lambda i: i.staged(lambda n: n.startswith("pages-")),
    "manifest": lambda i: i.staged(lambda n: n == "torpor.json"),
    "image": Injector.image_in_place,
    "keeper": lambda i: bool(i.forks()) or bool(i.workers()),
    "restored": lambda i: any(i.lab.is_app(r.pid) for r in i.new()),
    "record": lambda i: bool(i.records_now() - i.records_before),
    "pool": lambda i: i.pool_files_now() > i.pool_files,
}


def iterate(lab: Lab, scenario: str, body: Callable[[int, random.Random], bool]) -> None:
    """Run ``body(i, rng)`` for each iteration of ``scenario`` (it returns whether its fault
    fired), cleaning up after each. A broken invariant does not stop the others: every one
    found is reported at the end, each with its story and the seed that reproduces it."""
    rng, repro = scenario_rng(scenario)
    broken: list[str] = []
    fired = 0
    for i in range(ITERATIONS):
        mark = len(lab.log)
        began = time.monotonic()
        lab.note(f"[{repro} {scenario} #{i}]")
        try:
            fired += body(i, rng)
        except AssertionError as exc:
            story = "\n".join(lab.log[mark:])
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            broken.append(f"{story}\n  BROKEN: {first}")
            lab.note(f"  BROKEN: {first}")
        finally:
            lab.cleanup()
            lab.note(f"  ({time.monotonic() - began:.1f}s)")
    assert not broken, f"{len(broken)} of {ITERATIONS} iterations broke an invariant:\n" + (
        "\n".join(broken)
    )
    # A scenario whose faults never fire proves nothing (some miss by design: a moment drawn
    # after the command ended).
    lab.note(f"{scenario}: {fired} of {ITERATIONS} faults fired")
    assert fired >= 1, lab.fail(f"none of the {ITERATIONS} faults fired")
