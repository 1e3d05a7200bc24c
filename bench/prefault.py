"""Map a restored process's file-backed pages into its page tables from outside (issue 10).

Measured, not used by torpor (``bench/bench_torch_parts.py``, variants ``+prefault``): on the
torch app after a full restore, the first answer took 262-265 more minor faults than the next
(the copy's file pages, with fault-around) and ~1-3 ms more; prefaulting every readable file
mapping (~420 MB, one read per 64 KiB) took ~31 ms. Kept as the measuring tool.

A restored process starts with fresh page tables: CRIU maps its libraries' files again, and
every code or read-only data page it then touches takes a minor fault, even with the page
cache warm. :func:`prefault` takes those faults for it, from another process, by reading one
byte of each page (or of each ``step`` bytes) with ``process_vm_readv``: the kernel's
``pin_user_pages_remote`` faults each page into the target's page tables, and a read fault on
a file mapping also maps the cached pages around it (fault-around, 64 KiB by default).

``process_madvise`` cannot do this on kernel 6.18: for another process it accepts only
``MADV_COLD``, ``MADV_PAGEOUT``, ``MADV_WILLNEED`` and ``MADV_COLLAPSE``, and ``MADV_WILLNEED``
on a file mapping only reads ahead into the page cache (already warm here).

Only mappings of regular files that are readable are touched: never private anonymous memory
(a lazy copy's is registered with userfaultfd, and a read would wait for its daemon), never
``[vvar]`` and the like (no backing file). A page that cannot be read (a file shorter than its
mapping, a mapping gone meanwhile) is skipped. The target's ``/proc/PID/maps`` is read once;
its text is the kernel's, but the path part can hold any bytes a file name can: only the
address range, the permissions and the inode are used.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

PAGE = os.sysconf("SC_PAGE_SIZE")
IOV_MAX = 1024
FAULT_AROUND = 64 << 10  # the kernel's default fault_around_bytes


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_readv = _libc.process_vm_readv
_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_readv.restype = ctypes.c_ssize_t


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps``: what :func:`prefault` needs of it."""

    start: int
    end: int
    perms: str
    inode: int
    path: str


@dataclass
class Stats:
    """What one :func:`prefault` did."""

    mappings: int = 0
    touched: int = 0  # addresses read (one byte each)
    failed: int = 0  # addresses that could not be read (skipped)
    bytes: int = 0  # size of the ranges covered
    seconds: float = 0.0


def parse_maps(text: str) -> list[Mapping]:
    """The mappings of a ``/proc/PID/maps`` text; lines that do not parse are left out."""
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        span, perms, _offset, _dev, inode = parts[:5]
        lo, sep, hi = span.partition("-")
        try:
            start, end, ino = int(lo, 16), int(hi, 16), int(inode)
        except ValueError:
            continue
        if not sep or end <= start or len(perms) != 4:
            continue
        out.append(Mapping(start, end, perms, ino, parts[5] if len(parts) > 5 else ""))
    return out


def file_mappings(pid: int) -> list[Mapping]:
    """The readable mappings of files (an inode, a path) of ``pid``."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
        maps = parse_maps(fh.read())
    return [m for m in maps if m.inode != 0 and m.perms[0] == "r" and m.path.startswith("/")]


def addresses(ranges: Iterable[tuple[int, int]], step: int) -> list[int]:
    """One address per ``step`` bytes of each range, page aligned."""
    step = max(PAGE, step - step % PAGE)
    out: list[int] = []
    for start, end in ranges:
        out.extend(range(start - start % PAGE, end, step))
    return out


def touch(pid: int, addrs: list[int]) -> tuple[int, int]:
    """Read one byte at each of ``addrs`` in ``pid``; (read, failed)."""
    done = failed = 0
    buf = ctypes.create_string_buffer(IOV_MAX)
    local = _Iovec(ctypes.cast(buf, ctypes.c_void_p), 0)
    i = 0
    while i < len(addrs):
        batch = addrs[i : i + IOV_MAX]
        remote = (_Iovec * len(batch))(*[_Iovec(a, 1) for a in batch])
        local.iov_len = len(batch)
        n = _readv(pid, ctypes.byref(local), 1, remote, len(batch), 0)
        if n < 0:
            err = ctypes.get_errno()
            if err in (3, 1):  # ESRCH, EPERM: the process is gone or not ours
                raise OSError(err, os.strerror(err), f"pid {pid}")
            n = 0  # the first address failed (EFAULT and the like)
        # process_vm_readv stops at the first remote iovec it cannot read: skip that one.
        done += n
        i += n
        if n < len(batch):
            failed += 1
            i += 1
    return done, failed


def prefault(
    pid: int, *, step: int = FAULT_AROUND, ranges: list[tuple[int, int]] | None = None
) -> Stats:
    """Fault ``pid``'s file-backed pages in (every readable file mapping, or only ``ranges``
    of them), one read per ``step`` bytes."""
    t0 = time.perf_counter()
    maps = file_mappings(pid)
    spans = [(m.start, m.end) for m in maps]
    if ranges is not None:
        spans = clip(ranges, spans)
    addrs = addresses(spans, step)
    done, failed = touch(pid, addrs)
    return Stats(
        mappings=len(maps),
        touched=done,
        failed=failed,
        bytes=sum(e - s for s, e in spans),
        seconds=time.perf_counter() - t0,
    )


def clip(ranges: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``ranges`` inside ``spans`` (both sorted or not; the result sorted)."""
    spans = sorted(spans)
    out = []
    for lo, hi in sorted(ranges):
        for s, e in spans:
            if e <= lo:
                continue
            if s >= hi:
                break
            a, b = max(lo, s), min(hi, e)
            if a < b:
                out.append((a, b))
    return out
