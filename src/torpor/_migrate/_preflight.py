"""Pre-flight: what the target of a migration checks before the source freezes anything.

The source sends :func:`facts_for` (or :func:`facts`): its CRIU, its kernel, the process's
name and size, its CPU as CRIU describes it, and the files the process has open. The target
answers with :func:`problems`, each one line saying what is wrong and where. Only when the list
is empty does the source dump: a refused migration leaves the process untouched.

Checked on the target:

- its CRIU is at least the source's (an image is read by a CRIU as new as the one that wrote
  it), its kernel release at least the source's (an older kernel can lack what the image uses);
- its CPU has what the process may use: the source's ``cpuinfo.img`` (CRIU's CPUINFO_DUMP)
  travels base64 in the message, bounded and parsed (:mod:`torpor._engine._cpuinfo`), and CRIU's
  CPUINFO_CHECK judges it here with the capability set restores use (FPU|INS);
- the name is free; the images directory has room for an image of the process's size; the
  memory available (``MemAvailable``) holds its resident size;
- every regular file the process's tasks have open or mapped, and their executables, exist here
  as regular files (``lstat``: a symlink in their place is refused) of the size the process sees
  (CRIU refuses to restore a file whose size changed, unless it is open write-only for
  appending, as logs are); their working directories exist as directories. The files torpor
  itself replaces at restore (the root's stdout/stderr log, given anew through CRIU's
  ``inherit_fd``) are left out. Deleted files are left out too: CRIU carries them in the image;
- mode ``pool``: a pool configured here is the source's pool, and can be read
  (:func:`torpor._migrate._poolident.local_pool`).

The service addresses that move with the process are checked by the server right after these
(``_address.problems``, in :mod:`._serve`): they can be brought up there, none is in use.

Test-only hooks on the source (documented in docs/migration.md's pre-flight section):
``TORPOR_TEST_MIGRATE_CPUINFO=PATH`` sends the ``cpuinfo.img`` at PATH instead of this CPU's (a
doctored one simulates a target that lacks a feature), ``TORPOR_TEST_MIGRATE_RSS=BYTES`` claims
that resident size.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import platform
import re
import stat
from collections.abc import Iterator, Mapping
from typing import Any, TypeGuard

from .. import _paths
from .._engine import _cpuinfo, criu_version
from .._engine._criu import find_criu
from .._errors import ProcessNotFoundError, TorporError
from .._images._store import check_name
from .._process import _registry
from .._process._proc import descendants
from .._process._proc import facts as proc_facts

# The image is about the process's resident memory; some room beyond it for CRIU's other files.
_ROOM_FACTOR = 1.1
_ROOM_EXTRA = 16 << 20
MAX_FILES = 1024  # open and mapped files described in one message
MAX_PATH = 4096  # bytes, PATH_MAX
_MAX_CPUINFO_B64 = (_cpuinfo.MAX_IMAGE + 2) // 3 * 4
_SHOWN = 8  # file problems named one by one; the rest are counted
_CPUINFO_ENV = "TORPOR_TEST_MIGRATE_CPUINFO"
_RSS_ENV = "TORPOR_TEST_MIGRATE_RSS"

MODES = ("copy", "lazy", "pool")  # how memory moves: torpor migrate --mode


# -- the source --------------------------------------------------------------------------------


def facts_for(name: str, pid: int, *, mode: str = "copy") -> dict[str, Any]:
    """What the source tells the target in its ``preflight`` message about the managed process
    ``name`` (host pid ``pid``, the root of its tree), all of it gathered here."""
    _, rss = proc_facts(pid)
    return facts(name, rss, mode=mode, pid=pid)


def facts(
    name: str, rss_bytes: int, *, mode: str = "copy", pid: int | None = None
) -> dict[str, Any]:
    """The ``preflight`` message for ``name`` of resident size ``rss_bytes``; its open files
    are those of ``pid``, by default the pid of ``name``'s live record here (none if there is
    no such record). :class:`TorporError` if CRIU cannot describe this CPU or the process has
    more than :data:`MAX_FILES` files open: nothing is frozen yet."""
    if pid is None:
        pid = _record_pid(name)
    claimed = os.environ.get(_RSS_ENV)
    return {
        "type": "preflight",
        "mode": mode,
        "name": name,
        "criu": criu_version(),
        "kernel": platform.release(),
        "rss_bytes": int(claimed) if claimed and claimed.isdigit() else rss_bytes,
        "cpuinfo": base64.b64encode(_source_cpuinfo()).decode("ascii"),
        "files": open_files(pid) if pid is not None else [],
    }


def _record_pid(name: str) -> int | None:
    with contextlib.suppress(TorporError, OSError):
        rec = _registry.load(name)
        if rec.ended is None and rec.ref.alive():
            return rec.pid
    return None


def _source_cpuinfo() -> bytes:
    doctored = os.environ.get(_CPUINFO_ENV)
    if doctored:
        with open(doctored, "rb") as f:
            return f.read(_cpuinfo.MAX_IMAGE + 1)
    return cached_cpuinfo()


_CPUINFO_CACHE = "cpuinfo-cache.json"


def cached_cpuinfo() -> bytes:
    """This CPU's ``cpuinfo.img`` (:func:`_cpuinfo.dump`), kept in the home for as long as
    the machine runs and CRIU is the same binary (its key: the boot id and the binary's
    inode, size and mtime): starting CRIU for it cost every migration 30-150 ms before the
    freeze. A cached image is parsed as a peer's would be; one that does not parse is
    dumped again."""
    with contextlib.suppress(OSError):
        binary = find_criu()
        st = os.stat(binary)
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        key = f"{boot}:{binary}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        with contextlib.suppress(TorporError, OSError, ValueError, binascii.Error):
            known = json.loads(_paths.read_home_file(_CPUINFO_CACHE) or b"{}")
            if isinstance(known, dict) and isinstance(known.get(key), str):
                data = base64.b64decode(known[key], validate=True)
                _cpuinfo.parse(data)
                return data
        data = _cpuinfo.dump()
        with contextlib.suppress(TorporError, OSError):
            entry = {key: base64.b64encode(data).decode("ascii")}
            _paths.write_home_file(_CPUINFO_CACHE, json.dumps(entry).encode())
        return data
    return _cpuinfo.dump()


def open_files(pid: int) -> list[dict[str, Any]]:
    """The files CRIU will look for when it restores the tree rooted at ``pid``, as the
    ``files`` of a pre-flight message: ``{"path", "kind": "file"|"dir", "mode", "size",
    "sized"}``, ``sized`` when CRIU checks the size (every regular file but those open
    write-only for appending). Sorted by path, one entry per path."""
    found: dict[str, dict[str, Any]] = {}
    skip = _stdio_logs(pid)
    tasks = [pid, *descendants(pid)]
    for task in tasks:
        for path, st, sized in _task_files(task):
            if path in skip or path.endswith(" (deleted)") or not path.startswith("/"):
                continue
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
            if kind == "file" and not stat.S_ISREG(st.st_mode):
                continue
            entry = found.setdefault(
                path, {"path": path, "kind": kind, "mode": st.st_mode, "size": 0, "sized": False}
            )
            if kind == "file":
                entry["size"] = st.st_size
                entry["sized"] = entry["sized"] or sized
    if len(found) > MAX_FILES:
        raise TorporError(
            f"pid {pid}'s tree has {len(found)} files open or mapped, over the {MAX_FILES} "
            "pre-flight describes",
            hint="close files the process does not need, then migrate again",
        )
    for entry in found.values():
        if len(os.fsencode(entry["path"])) > MAX_PATH:
            raise TorporError(f"pid {pid} has a file open whose path is over {MAX_PATH} bytes")
    return [found[p] for p in sorted(found)]


def _task_files(pid: int) -> Iterator[tuple[str, os.stat_result, bool]]:
    """(path, stat, size checked) of each file of ``pid``: its fds' regular files, its mapped
    files, its executable and working directory. Gone files and tasks are skipped."""
    proc = f"/proc/{pid}"
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"{proc}/fd"):
            with contextlib.suppress(OSError):
                path = os.readlink(f"{proc}/fd/{fd}")
                st = os.stat(f"{proc}/fd/{fd}")
                if stat.S_ISREG(st.st_mode):
                    yield path, st, _size_checked(_fd_flags(pid, fd))
    with contextlib.suppress(OSError):
        with open(f"{proc}/maps", encoding="utf-8", errors="surrogateescape") as f:
            ranges: dict[str, str] = {}
            for line in f:
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    ranges.setdefault(parts[5], parts[0])
        for path, span in ranges.items():
            with contextlib.suppress(OSError):
                # map_files follows to the very file mapped, not to whatever the path names now.
                yield path, os.stat(f"{proc}/map_files/{span}"), True
    for link, sized in (("exe", True), ("cwd", False)):
        with contextlib.suppress(OSError):
            yield os.readlink(f"{proc}/{link}"), os.stat(f"{proc}/{link}"), sized


def _fd_flags(pid: int, fd: str) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    return 0


def _size_checked(flags: int) -> bool:
    # CRIU's should_check_size() (criu/files-reg.c): not for O_WRONLY|O_APPEND (logs).
    return not ((flags & os.O_ACCMODE) == os.O_WRONLY and flags & os.O_APPEND)


def _stdio_logs(pid: int) -> set[str]:
    """The regular files the root writes its stdout and stderr to: a restore gives the copy
    its own log in their place (``inherit_fd``), so the target needs none of them."""
    out = set()
    for fd in ("1", "2"):
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            if stat.S_ISREG(st.st_mode) and _fd_flags(pid, fd) & os.O_ACCMODE != os.O_RDONLY:
                out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


# -- the target --------------------------------------------------------------------------------


def version_tuple(text: str) -> tuple[int, ...]:
    """The leading dotted numbers of a version (``6.18.1-amd64`` -> ``(6, 18, 1)``)."""
    m = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


_MAX_VERSION = 64  # characters of a CRIU version or kernel release the peer may send
_MAX_RSS = 1 << 62  # bytes: far beyond any machine, short of float and int-parsing limits


def _is_version(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= _MAX_VERSION and value.isprintable()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def problems(
    msg: Mapping[str, Any], *, where: str, verdicts: dict[bytes, list[str]] | None = None
) -> list[str]:
    """What keeps this host (``where``, as the source knows it) from taking the migration
    ``msg`` describes; empty if nothing. ``msg`` comes from the peer: every field is checked.

    ``verdicts``: CRIU's cpuinfo verdicts by the SHA-256 of the source's ``cpuinfo.img``,
    kept by a server for its life (this CPU does not change under it), so that the next
    migration from the same CPU starts no CRIU for it (30-150 ms of every pre-flight)."""
    out: list[str] = []
    name, mode = msg.get("name"), msg.get("mode")
    src_criu, src_kernel, rss = msg.get("criu"), msg.get("kernel"), msg.get("rss_bytes")
    if mode not in MODES:
        out.append(f"mode {mode!r} is not served on {where} (only {', '.join(MODES)})")
    if not _is_version(src_criu) or not _is_version(src_kernel):
        return [*out, "the pre-flight message lacks the source's CRIU and kernel versions"]
    if not isinstance(rss, int) or not _is_int(rss) or rss > _MAX_RSS:
        return [*out, "the pre-flight message gives no process size"]
    try:
        mine = criu_version()
    except TorporError as exc:
        out.append(f"CRIU is not usable on {where}: {exc.msg}")
    else:
        if version_tuple(mine) < version_tuple(src_criu):
            out.append(f"CRIU {mine} on {where} is older than the source's {src_criu}")
    kernel = platform.release()
    if version_tuple(kernel) < version_tuple(src_kernel):
        out.append(f"kernel {kernel} on {where} is older than the source's {src_kernel}")
    if not isinstance(name, str):
        return [*out, "the pre-flight message names no process"]
    try:
        check_name(name, what="process name")
    except TorporError as exc:
        return [*out, f"the process name is refused on {where}: {exc.msg}"]
    try:
        rec = _registry.load(name)
    except ProcessNotFoundError:
        pass
    except TorporError as exc:
        out.append(f"the name {name!r} cannot be checked on {where}: {exc.msg}")
    else:
        if rec.state == "running":
            out.append(f"the name {name!r} is taken on {where}: pid {rec.pid} runs under it")
    out += _room_problems(rss, where)
    out += _cpu_problems(msg.get("cpuinfo"), where, verdicts)
    out += _file_problems(msg.get("files"), where)
    if mode == "pool":
        from ._poolident import pool_problems

        out += pool_problems(msg.get("pool"), where=where)
    return out


def _room_problems(rss: int, where: str) -> list[str]:
    out = []
    images = _paths.images_dir()
    st = os.statvfs(images)
    free = st.f_bavail * st.f_frsize
    need = int(rss * _ROOM_FACTOR) + _ROOM_EXTRA
    if free < need:
        out.append(
            f"{images} on {where} has {free >> 20} MiB free; an image of this process needs "
            f"about {need >> 20} MiB"
        )
    available = mem_available()
    if available is not None and available < rss:
        out.append(
            f"{where} has {available >> 20} MiB of memory available; the process's resident "
            f"size is {rss >> 20} MiB"
        )
    return out


def mem_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None if the kernel does not say)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


_MAX_VERDICTS = 64  # CPUs a server remembers the verdict for


def _cpu_problems(
    raw: object, where: str, verdicts: dict[bytes, list[str]] | None = None
) -> list[str]:
    if not isinstance(raw, str) or len(raw) > _MAX_CPUINFO_B64:
        return ["the pre-flight message lacks the source's CPU description (cpuinfo)"]
    try:
        data = base64.b64decode(raw, validate=True)
        theirs = _cpuinfo.parse(data)
    except (binascii.Error, ValueError):
        return ["the pre-flight message's CPU description (cpuinfo) is not base64"]
    except _cpuinfo.CpuInfoError as exc:
        return [f"the source's CPU description is refused on {where}: {exc.msg}"]
    key = hashlib.sha256(data).digest()
    verdict = verdicts.get(key) if verdicts is not None else None
    if verdict is None:
        try:
            verdict = _cpuinfo.check(data)
        except TorporError as exc:
            return [f"the CPU of {where} cannot be checked: {exc.msg}"]
        if verdicts is not None:
            if len(verdicts) >= _MAX_VERDICTS:
                verdicts.clear()
            verdicts[key] = verdict
    if not verdict:
        return []
    return [
        f"the CPU of {where} ({_cpuinfo.this_cpu()}) lacks a feature the process may use on "
        f"the source's ({theirs.describe()}): CRIU's cpuinfo check says: {verdict[0]}"
    ]


def _file_problems(files: object, where: str) -> list[str]:
    if not isinstance(files, list) or len(files) > MAX_FILES:
        return ["the pre-flight message lacks a list of the process's files"]
    found: list[str] = []
    for entry in files:
        fact = _file_fact(entry)
        if fact is None:
            return [f"the pre-flight message describes a file badly: {str(entry)[:200]!r}"]
        problem = _file_problem(*fact, where)
        if problem is not None:
            found.append(problem)
    if len(found) > _SHOWN:
        found = [*found[:_SHOWN], f"and {len(found) - _SHOWN} more files differ on {where}"]
    return found


def _file_fact(entry: object) -> tuple[str, str, int, int, bool] | None:
    """(path, kind, mode, size, sized) of a ``files`` entry, None if it is malformed."""
    if not isinstance(entry, dict) or set(entry) != {"path", "kind", "mode", "size", "sized"}:
        return None
    path, kind, mode, size, sized = (entry[k] for k in ("path", "kind", "mode", "size", "sized"))
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        return None
    try:
        encoded = path.encode(errors="surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no file name can hold
        return None
    if len(encoded) > MAX_PATH or "/../" in f"{path}/":
        return None
    if kind not in ("file", "dir") or not _is_int(mode) or not _is_int(size):
        return None
    if not isinstance(sized, bool):
        return None
    return path, kind, mode, size, sized


def _file_problem(
    path: str, kind: str, mode: int, size: int, sized: bool, where: str
) -> str | None:
    # lstat: a symlink where the process had a file is not that file (CRIU would follow it).
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{path} is missing on {where}"
    except OSError as exc:
        return f"{path} cannot be checked on {where}: {exc.strerror}"
    if kind == "dir":
        return None if stat.S_ISDIR(st.st_mode) else f"{path} is not a directory on {where}"
    if not stat.S_ISREG(st.st_mode):
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        return f"{path} is {what} on {where}"
    if sized and st.st_size != size:
        return (
            f"{path} is {st.st_size} bytes on {where}, {size} where the process has it open "
            "(CRIU refuses a file whose size changed)"
        )
    return None
