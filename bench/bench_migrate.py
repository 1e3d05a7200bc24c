#!/usr/bin/env python3
"""Migration benchmark (issue 9): ``torpor migrate`` copy / lazy / pool next to bare CRIU doing
the same steps, side by side in one run, for apps of ``--sizes`` (100 MiB and 1 GiB).

The bench makes its own lab (``scripts/lab-hosts up --hosts 2`` in a temporary directory, taken
down at the end, always; ``migrate_lab.py``), makes hosts a and b trust each other by
certificate (as the migration tests do), and starts ``torpor agent run --listen B:7070`` on
b. Each migration moves a fresh app (``bench/migrate_app.py app``: SIZE bytes of touched
incompressible memory, started with ``torpor run`` on a) from a to b. The variants:

- ``torpor copy``  ``torpor migrate NAME --to B:7070 --mode copy --json`` on a
- ``torpor lazy``  the same, ``--mode lazy`` (post-copy)
- ``torpor pool``  the same, ``--mode pool --pool shared``: a dir pool in a directory of the
                   filesystem the lab's hosts share, made on both (``torpor pool create``)
- ``criu copy``    bare CRIU: ``criu dump -t PID -D DIR`` on a, DIR sent to b as a tar stream
                   over one plain TCP connection, ``criu restore -D DIR -d`` on b
- ``criu lazy``    ``criu dump --lazy-pages --port P`` on a, the other files sent the same way,
                   ``criu lazy-pages --page-server --address A --port P`` and ``criu restore
                   --lazy-pages -d`` on b
- ``base lazy``    ``torpor lazy`` from another source tree (``--base-src DIR``: its ``src``
                   directory), through a second agent on b (port 7071) also run from it: the
                   code before a change next to the code after, in the same lab and rounds

A torpor row whose command answers "not built" (or "not served") is reported as such. Bare CRIU
dumps the very process torpor would (started by ``torpor run``: pid 1 of its own PID
namespace, session leader, stdio on its log), as ``bench_restore.py``'s bare rows do; its
receiver on b (``migrate_app.py bare-receive``) is started before the clock starts, as b's
agent is.

What is measured, by the lab's client node (``migrate_app.py client``):

- **downtime**: the longest gap the client saw between two successive signs of life of the app
  across the move. ``--client heartbeat`` (default): UDP heartbeats the app sends every ~1 ms
  (arrival times on the client's clock). ``--client tcp``: answers to a request made every
  ~5 ms over a new TCP connection, to a's address and then b's (the app's address does not move:
  lab hosts have addresses of their own and this measures the app's own gap, not a kept
  connection).
- **total**: from the start of the first command (``torpor migrate``, or bare ``criu dump``) to
  the first sign of life from b; **command**: to the end of the last command (for lazy rows:
  until every page has moved, i.e. the source is free).
- every copy's memory checksum (``SUM``) equals the original's, and nothing answers from a
  once b has answered.

Rounds: each size runs ``--rounds`` (default 5 at 100 MiB, 3 at 1 GiB) with the variants in an
order that rotates each round, after an untimed warm-up of each variant at the smallest size.
Before each migration the memory it will need is freshly touched (``bench_restore.quiesce``).
Tables give the median and min-max over the rounds, and torpor copy's per-round ratio to bare
``criu copy``. Raw samples (JSON), tables and a plot go to ``bench/out/``; ``--publish`` copies
the plot to ``bench/migrate.png`` and the raw samples to ``bench/runs/``.

Run as root, from the repo or (the code as committed) from an export::

    d=$(mktemp -d) && git archive HEAD src bench scripts | tar -x -C $d
    git rev-parse --short HEAD >$d/COMMIT
    PYTHONPATH=$d/src .venv/bin/python $d/bench/bench_migrate.py [--quick] [--publish-dir bench]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_restore import alive, criu_binary, kill, machine, parse_size, quiesce
from bench_supervise import interrupts_as_keyboard
from migrate_lab import (
    APP,
    APP_PORT,
    BENCH,
    HB_PORT,
    POOL,
    STEP_TIMEOUT,
    TORPOR,
    Client,
    Lab,
    base_env,
    log,
    make_pool,
    set_rto_min,
    start_agent,
    start_source_agent,
    torpor,
    trust_each_other,
)
from migrate_report import VARIANTS, Sample, breakdown, plot, seen, table, targets

OUT = BENCH / "out"
LAUNCHER = str(Path(sys.executable).with_name("torpor"))  # the native launcher (bin/torpor.c)
RECV_PORT, LAZY_PORT = 7171, 7272
TCP_PATIENCE = 60.0  # seconds the client may take to hear from b once the move is done
BASELINE = 0.5  # seconds of heartbeats recorded before and after each move


# -- one migration ----------------------------------------------------------------------------


def last_line(text: str) -> str:
    return (text.strip().splitlines() or ["(no output)"])[-1]


class NotBuilt(Exception):
    """The torpor command says this mode is not built (yet)."""


@dataclass
class Run:
    """One app on a, about to move."""

    name: str
    token: str
    pid: int
    service: str | None  # its service address (ADDR/PREFIX), or None (heartbeat mode)
    at: str  # where it answers: the service address, or a's


class Bench:
    def __init__(self, lab: Lab, client: Client, agent: str, args: argparse.Namespace) -> None:
        self.lab, self.client, self.agent, self.args = lab, client, agent, args
        self.base_agent: str | None = None  # --base-src: b's agent of the other tree
        self.seq = 0
        self.a, self.b = lab.address("a"), lab.address("b")
        self.by_ip = {self.a: "a", self.b: "b"}
        self.by_net = {int(lab.run(h, "stat", "-L", "-c", "%i", "/proc/self/ns/net")): h
                       for h in ("a", "b")}  # fmt: skip
        self.not_built: dict[str, str] = {}
        self.failures: list[str] = []

    def ps(self, host: str, name: str) -> dict[str, Any]:
        found = [p for p in json.loads(torpor(self.lab, host, "ps", "--json")) if p["name"] == name]
        return found[0] if found else {}

    def launch(self, size: int, variant: str) -> Run:
        """A fresh app on a (``torpor run``, on a service address of its own in service
        mode), once it answers."""
        self.seq += 1
        name = f"mig-{size >> 20}m-{variant.replace(' ', '-')}-{self.seq}"
        token = os.urandom(6).hex()
        service, bind, extra = None, "0.0.0.0", []
        if self.args.client == "service":
            net = ipaddress.ip_network(self.lab.info["subnet"])
            service = f"{net.network_address + 100 + self.seq % 100}/{net.prefixlen}"
            bind, extra = service.split("/")[0], ["--service-address", service]
        client = self.lab.address("client")
        app = [sys.executable, str(APP), "app", str(size), token, client, str(HB_PORT), bind]
        torpor(self.lab, "a", "run", "--name", name, *extra, "--", *app, str(APP_PORT))
        run = Run(name, token, int(self.ps("a", name)["pid"]), service, bind)
        if service is None:
            run.at = self.a
        deadline = time.monotonic() + STEP_TIMEOUT
        while self.client.ask(run.at, "ASK").get("token") != token:
            if not alive(run.pid) or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not come up on a")
            time.sleep(0.1)
        return run

    def one(self, variant: str, size: int, round_no: int = 0) -> Sample:
        run = self.launch(size, variant)
        target_pid: int | None = None
        try:
            reference = self.client.ask(run.at, "SUM")["answer"]
            quiesce(2 * size + size // 4 + (64 << 20), Path(tempfile.gettempdir()))
            self.client.call(f"watch {run.token}")
            if run.service:
                self.client.call(f"keep {run.token} {run.at} {APP_PORT}")
            time.sleep(BASELINE)
            t0 = time.monotonic()
            summary: dict[str, Any] = {}
            steps: dict[str, float] = {}
            moved = False
            try:
                if not variant.startswith("criu"):
                    summary, done = self.torpor_move(run.name, variant), time.monotonic()
                else:
                    steps, done = self.bare_move(run, variant)
                moved = True
            finally:
                if moved:
                    self.wait_target(run, deadline=time.monotonic() + TCP_PATIENCE)
                    time.sleep(BASELINE)
                got = self.client.call("stop")
            target_pid = int(summary.get("target_pid") or steps.get("recv_pid") or 0) or None
            beats = [(float(t), self.by_ip.get(str(ip), str(ip))) for t, ip in got["beats"]]
            hb = seen(beats, t0, "a", "b")
            saw = hb
            if run.service:
                answers = [(float(t), self.by_net.get(int(n), str(n))) for t, n in got["answers"]]
                saw = seen(answers, t0, "a", "b")
            check = self.client.ask(run.at if run.service else self.b, "SUM")
            if (check.get("token"), check.get("answer")) != (run.token, reference):
                raise RuntimeError(f"{variant}: the copy on b answered {check}, not {reference}")
            if alive(run.pid) or saw.from_source_after or hb.from_source_after:
                raise RuntimeError(f"{variant}: the original on a lives on (pid {run.pid})")
            return Sample(
                variant, size, round_no, saw.downtime, saw.total, done - t0, saw.baseline_gap,
                saw.gap_at, summary, steps, heartbeat_gap=hb.downtime,
                connections=int(got["connections"]), errors=list(got["errors"]),
            )  # fmt: skip
        finally:
            for p in (run.pid, target_pid):
                if p is not None and alive(p):
                    kill(p)
            if not variant.startswith("criu") and target_pid is None:
                with contextlib.suppress(RuntimeError, KeyError, ValueError):
                    kill(int(self.ps("b", run.name)["pid"]))
            if run.service:
                for host in ("a", "b"):  # the address and CRIU's lock tables, wherever they are
                    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                        self.lab.run(host, sys.executable, str(APP), "cleanup", run.service)

    def wait_target(self, run: Run, deadline: float) -> None:
        """Until the client has heard from b (TCP retransmissions back off: 0.2 s, doubling,
        so its first answer from b can come seconds after the copy runs) or ``deadline``."""
        key, on_b = ("answer", self.by_net) if run.service else ("beat", self.by_ip)
        while time.monotonic() < deadline:
            last = self.client.call("peek")[key]
            if last is not None and on_b.get(last[1]) == "b":
                return
            time.sleep(0.05)

    def torpor_move(self, name: str, variant: str) -> dict[str, Any]:
        mode = variant.split()[1]
        launch: tuple[str, ...] = (LAUNCHER,) if self.args.source_agent else TORPOR
        agent = self.agent
        if variant.startswith("base"):
            assert self.base_agent is not None
            launch, agent = (*base_env(self.args.base_src), *TORPOR), self.base_agent
        cmd = [*launch, "migrate", name, "--to", agent, "--mode", mode, "--json"]
        if mode == "pool":
            if self.args.pool == "none":
                raise NotBuilt("no pool (--pool none)")
            cmd += ["--pool", POOL]
        res = subprocess.run(
            self.lab.argv("a", *cmd), capture_output=True, text=True, timeout=STEP_TIMEOUT,
            check=False,
        )  # fmt: skip
        if res.returncode != 0:
            last = last_line(res.stderr)
            if any(w in last for w in ("not built", "not served", "does not move yet")):
                raise NotBuilt(last)
            raise RuntimeError(f"torpor migrate --mode {mode}: {last}")
        summary: dict[str, Any] = json.loads(res.stdout)
        return summary

    def bare_move(self, run: Run, variant: str) -> tuple[dict[str, float], float]:
        """Bare CRIU's steps; their monotonic times, and when the last one ended."""
        lazy = variant == "criu lazy"
        images = f"{self.lab.home}/bare-{self.seq}"
        log_file = f"{self.lab.home}/logs/{run.name}.log"
        service = ["--service", run.service] if run.service else []
        # A port of its own each time: the last one's page server may still hold its port.
        lazy_port = LAZY_PORT + self.seq % 500
        extra = [*service, *(["--lazy-from", f"{self.a}:{lazy_port}"] if lazy else [])]
        recv = self.lab.start("b", sys.executable, str(APP), "bare-receive", self.b,
                              str(RECV_PORT), images, log_file, *extra)  # fmt: skip
        assert recv.stdout is not None and recv.stderr is not None
        if recv.stdout.readline() != "listening\n":
            raise RuntimeError(f"bare-receive: {recv.communicate()[1].strip()}")
        extra = [*service, *(["--lazy-port", str(lazy_port)] if lazy else [])]
        send = self.lab.start("a", sys.executable, str(APP), "bare-send", str(run.pid), images,
                              self.b, str(RECV_PORT), *extra)  # fmt: skip
        try:
            out_s, err_s = send.communicate(timeout=STEP_TIMEOUT)
            if send.returncode != 0:
                kill(recv.pid)  # it would wait for the stream for ever
            out_r, err_r = recv.communicate(timeout=STEP_TIMEOUT)
            done = time.monotonic()
            if send.returncode != 0 or recv.returncode != 0:
                raise RuntimeError(f"{variant}: {last_line(err_s)} / {last_line(err_r)}")
        except BaseException:
            for proc in (send, recv):
                if proc.poll() is None:
                    kill(proc.pid)
            for host in ("a", "b"):  # what the drivers left in the hosts' tmpfs homes
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self.lab.run(host, "rm", "-rf", images, timeout=60)
            raise
        steps: dict[str, float] = {}
        for side, out in (("send", out_s), ("recv", out_r)):
            for line in out.splitlines():
                steps.update({f"{side}_{k}": v for k, v in json.loads(line).items()})
        return steps, done

    def rounds(self, size: int, reps: int, variants: list[str]) -> list[Sample]:
        samples: list[Sample] = []
        for r in range(reps):
            k = r % len(variants)
            order = variants[k:] + variants[:k]
            line = []
            for v in order:
                if v in self.not_built:
                    continue
                try:
                    s = self.one(v, size, r)
                except NotBuilt as exc:
                    self.not_built[v] = str(exc)
                    log(f"{v}: not built ({exc})")
                    continue
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    # A failed migration is a result too: recorded, and the round goes on.
                    self.failures.append(f"{size >> 20} MiB, round {r + 1}, {v}: {exc}")
                    log(f"FAILED: {self.failures[-1]}")
                    continue
                samples.append(s)
                line.append(f"{v} {s.downtime * 1000:.0f} ms / {s.total:.2f} s")
            log(f"{size >> 20} MiB round {r + 1}/{reps}: " + ", ".join(line))
        return samples


def code_state() -> dict[str, str]:
    exported = BENCH.parent / "COMMIT"
    if exported.exists():  # a `git archive` of one commit: the code as committed
        return {"commit": exported.read_text().strip(), "uncommitted": "none (git archive)"}
    git = ["git", "-C", str(BENCH.parent)]
    head = subprocess.run(
        [*git, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "src", "bench"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {"commit": head, "uncommitted": ", ".join(x[3:] for x in dirty.splitlines()) or "none"}


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100M,1G", help="app memory sizes (default 100M,1G)")
    p.add_argument("--rounds", default="5,3", help="rounds per size, one or one per size")
    p.add_argument(
        "--variants",
        default=",".join(v for v in VARIANTS if not v.startswith("base")),
        help="comma-separated variants (default: all but base lazy)",
    )
    p.add_argument(
        "--client",
        choices=("service", "heartbeat"),
        default="service",
        help="how the client sees the app: answers on one kept TCP connection to a service "
        "address that moves with it (default), or its UDP heartbeats only",
    )
    p.add_argument(
        "--pool",
        choices=("dir", "none"),
        default="dir",
        help="torpor pool's pool: a dir pool in a directory both hosts share (default), or none",
    )
    p.add_argument(
        "--rto-min",
        type=int,
        metavar="MS",
        help="TCP's minimum retransmission timeout on the lab's routes (Linux: 200 ms)",
    )
    p.add_argument(
        "--source-agent",
        action="store_true",
        help="run an agent on a too and send a's torpor migrate through the native launcher "
        "to it (as a host of a deployment does), instead of a fresh python -m torpor each move",
    )
    p.add_argument(
        "--base-src",
        type=Path,
        metavar="DIR",
        help="the src directory of another torpor tree, for the base lazy variant (before/after)",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round of 64 MiB")
    p.add_argument("--publish-dir", type=Path, help="copy the plot and raw samples there")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.no_warmup = "64M", "1", True
    args.size_list = [parse_size(z) for z in args.sizes.split(",") if z.strip()]
    reps = [int(r) for r in str(args.rounds).split(",") if r.strip()]
    if len(reps) not in (1, len(args.size_list)):
        p.error("--rounds: one number, or one per size")
    args.reps = reps * len(args.size_list) if len(reps) == 1 else reps
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variant_list) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if any(v.startswith("base") for v in args.variant_list) != (args.base_src is not None):
        p.error("--base-src and the base lazy variant go together")
    if args.base_src is not None:
        args.base_src = args.base_src.resolve()
        if not (args.base_src / "torpor" / "__init__.py").is_file():
            p.error(f"--base-src {args.base_src}: no torpor package there")
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("bench_migrate: needs root (CRIU, namespaces)", file=sys.stderr)
        return 2
    os.environ["CRIU"] = criu_binary()
    OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    info = machine() | code_state() | {"client": args.client, "rto_min": args.rto_min or 200}
    info["source_agent"] = args.source_agent
    if args.base_src is not None:
        info["base_src"] = str(args.base_src)
    log(f"machine: {info}")
    samples: list[Sample] = []
    bench = None
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-migrate-"))
    with interrupts_as_keyboard():
        lab = Lab(tmp / "lab")
        try:
            trust_each_other(lab, tmp)
            if args.pool == "dir":
                make_pool(lab, tmp)
            if args.rto_min is not None:
                set_rto_min(lab, args.rto_min)
            if args.source_agent:
                start_source_agent(lab)
            bench = Bench(lab, Client(lab), start_agent(lab), args)
            if args.base_src is not None:
                bench.base_agent = start_agent(lab, args.base_src)
            if not args.no_warmup:
                for v in args.variant_list:
                    with contextlib.suppress(NotBuilt):
                        bench.one(v, min(args.size_list))
                log("warm-up done")
            for size, reps in zip(args.size_list, args.reps, strict=True):
                samples += bench.rounds(size, reps, args.variant_list)
        except KeyboardInterrupt:
            log("interrupted: taking the lab down")
            return 130
        except Exception:  # report what was measured before it
            import traceback

            info["failed"] = traceback.format_exc().strip().splitlines()[-1]
            log(f"the run failed, reporting what it measured:\n{traceback.format_exc()}")
        finally:
            lab.down()
            shutil.rmtree(tmp, ignore_errors=True)
    not_built = bench.not_built if bench else {}
    sizes = [z for z in args.size_list if any(s.size == z for s in samples)]
    failures = bench.failures if bench else []
    text = "\n\n".join(
        ["Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items())]
        + [part for z in sizes for part in (table(z, samples, not_built), breakdown(z, samples))]
        + ([targets(samples, sizes)] if sizes else [])
        + (
            ["Failed migrations (not in the figures):\n\n" + "\n".join(f"- {f}" for f in failures)]
            if failures
            else []
        )
    )
    print(text)
    raw = {
        "machine": info,
        "args": sys.argv[1:],
        "not_built": not_built,
        "failures": failures,
        "samples": [s.__dict__ for s in samples],
    }
    (OUT / f"migrate-{stamp}.md").write_text(text + "\n")
    (OUT / f"migrate-{stamp}.json").write_text(json.dumps(raw, indent=2))
    png = OUT / f"migrate-{stamp}.png"
    if sizes:
        plot(samples, sizes, png, args.client)
    log(f"wrote {OUT}/migrate-{stamp}.{{md,json,png}}")
    if args.publish_dir:
        (args.publish_dir / "runs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(
            OUT / f"migrate-{stamp}.json", args.publish_dir / "runs" / f"migrate-{stamp}.json"
        )
        if png.exists():
            shutil.copyfile(png, args.publish_dir / "migrate.png")
    return 1 if "failed" in info else 0


if __name__ == "__main__":
    raise SystemExit(main())
