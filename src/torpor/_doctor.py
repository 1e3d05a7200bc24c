"""Capabilities of this machine for torpor, probed once and reported plainly (``torpor doctor``).

Each probe answers works / missing and, when missing, what it costs the user.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._errors import TorporError


@dataclass(frozen=True)
class Capability:
    """One probed capability. ``cost`` says what the user loses when it is missing."""

    name: str
    ok: bool
    detail: str
    cost: str = ""


def _in_child(fn: Callable[[], object]) -> bool:
    """Run ``fn`` in a forked child (namespace probes must not change us); True if it worked."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            fn()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _unshare_probe(flag: int) -> bool:
    from ._process._proc import unshare

    return _in_child(lambda: unshare(flag))


def _cap_sys_admin() -> bool:
    from ._process._proc import status_field

    cap_eff = status_field("CapEff")
    return bool(cap_eff) and bool(int(cap_eff[0], 16) & (1 << 21))


@functools.cache
def probe() -> tuple[Capability, ...]:
    """Probe everything (cached for the life of the process)."""
    caps: list[Capability] = []
    root = os.geteuid() == 0
    caps.append(
        Capability(
            "privileges",
            root and _cap_sys_admin(),
            "root with CAP_SYS_ADMIN" if root else f"uid {os.geteuid()}",
            "" if root else "CRIU needs root: checkpoint and restore will fail",
        )
    )
    caps.append(Capability("kernel", True, platform.release()))
    criu_ok = False
    try:
        from ._engine import CriuEngine

        engine = CriuEngine()
        version = engine.version()
        criu_ok = True
        caps.append(Capability("criu", True, f"{engine.binary} (version {version})"))
    except TorporError as exc:
        caps.append(Capability("criu", False, str(exc), "nothing works without CRIU >= 4.2"))
    if criu_ok and root:
        try:
            engine.check()
            caps.append(Capability("criu check", True, "looks good"))
        except TorporError as exc:
            caps.append(Capability("criu check", False, str(exc), "dumps may fail"))
        caps.append(kdat_capability(engine.binary))
        feats = engine.features()
        caps.append(
            Capability(
                "lazy pages (userfaultfd)",
                feats.lazy_pages,
                "supported" if feats.lazy_pages else "missing",
                "" if feats.lazy_pages else "migration copies all memory before resuming",
            )
        )
        caps.append(
            Capability(
                "memory tracking (soft-dirty)",
                feats.mem_track,
                "supported" if feats.mem_track else "missing (kernel without soft-dirty)",
                ""
                if feats.mem_track
                else "no pre-dump: every checkpoint freezes the process for a full copy "
                "(pools still deduplicate unchanged pages when stored)",
            )
        )
    nft = shutil.which("nft")
    caps.append(
        Capability(
            "tcp connections",
            criu_ok and nft is not None,
            f"CRIU >= 4.2 and nftables ({nft})" if nft else "nftables (`nft`) missing",
            "" if nft else "--tcp-established cannot lock the network: install nftables",
        )
    )
    if root:
        for name, flag, cost in (
            ("pid namespaces", 0x20000000, "`torpor run` cannot isolate pids: restores clash"),
            ("mount namespaces", 0x00020000, "no private /proc for restored trees"),
            ("net namespaces", 0x40000000, "no isolated network for migration tests"),
        ):
            ok = _unshare_probe(flag)
            caps.append(
                Capability(name, ok, "works" if ok else "unshare failed", "" if ok else cost)
            )
    try:
        with open("/proc/sys/fs/pipe-max-size", encoding="ascii") as fh:
            pipe_max = int(fh.read())
    except OSError:
        pipe_max = 0
    caps.append(
        Capability(
            "fs.pipe-max-size",
            pipe_max >= 4 << 20,
            f"{pipe_max} bytes",
            ""
            if pipe_max >= 4 << 20
            else "lazy-page migration is slow: sysctl -w fs.pipe-max-size=4194304",
        )
    )
    home = _home_capability()
    caps.append(home)
    if home.ok:
        caps.append(_agent_capability())
    return tuple(caps)


def kdat_capability(binary: str) -> Capability:
    """Whether CRIU loads its kernel facts from a cache rather than probing the kernel for
    30-65 ms in every CRIU process (``_engine._kdat``). Makes the cache if it is missing, as
    the next restore would: what is reported is what a restore gets."""
    from ._engine import _kdat

    name = "criu kernel-facts cache"
    cost = "each CRIU process probes the kernel first (30-65 ms here; twice per lazy restore)"
    if os.environ.get(_kdat.ENV, "").strip().lower() in ("0", "off", "no", "false"):
        return Capability(name, False, f"off ({_kdat.ENV}={os.environ[_kdat.ENV]})", cost)
    try:
        fd = os.open(_kdat.RUN, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return Capability(name, False, f"{_kdat.RUN}: {exc.strerror}", cost)
    try:
        tmpfs = _kdat.fs_type(fd) == _kdat.TMPFS_MAGIC
    finally:
        os.close(fd)
    if tmpfs:
        return Capability(name, True, f"kept by CRIU itself ({_kdat.RUN} is a tmpfs)")
    if os.geteuid() != 0:
        return Capability(
            name, False, f"not made: {_kdat.RUN} is not a tmpfs and this is not root", cost
        )
    if _kdat.ensure(binary):
        return Capability(name, True, f"{_kdat.KDAT} (torpor's read-only bind mount, until reboot)")
    return Capability(
        name,
        False,
        f"could not be made over {_kdat.KDAT} ({_kdat.RUN} is not a tmpfs)",
        cost,
    )


def _home_capability() -> Capability:
    """Whether the torpor home is one torpor will use: its own directories, none of them
    changeable by another user (the check every command makes)."""
    from . import _paths

    try:
        for accessor in (
            _paths.home,
            _paths.procs_dir,
            _paths.logs_dir,
            _paths.images_dir,
            _paths.cache_dir,
            _paths.pools_dir,
        ):
            accessor()
    except TorporError as exc:
        return Capability("torpor home", False, str(exc), "every command refuses this home")
    return Capability("torpor home", True, f"{_paths.home()} (private)")


def _agent_capability() -> Capability:
    """Whether commands are fast: an agent serves this home, and the native launcher is the
    ``torpor`` command (rather than the Python one, ~10 ms slower to start)."""
    from ._agent_status import launcher_dir, status

    st = status()

    launcher = Path(launcher_dir()) / "torpor"
    try:
        with open(launcher, "rb") as fh:
            native = fh.read(4) == b"\x7fELF"
    except OSError:
        native = False
    how = "native launcher" if native else "Python launcher (no C compiler at install)"
    if st.running:
        return Capability("agent", True, f"running (pid {st.pid}); {how}")
    return Capability(
        "agent",
        False,
        f"not running; {how}",
        "each command pays ~80 ms of Python start-up (`torpor restore` +75 % on a 100 MiB "
        "image): `torpor agent start`",
    )
