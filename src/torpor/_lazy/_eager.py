"""Warm sets of local lazy restores: recorded from the daemon's faults, replayed eagerly.

A local lazy restore lets ``criu lazy-pages`` read the verified image itself (faster than
torpor's page server, see ``_restore.LazyCopies``), so there is no page server to note which
pages the app touched first. Instead:

Recording (:func:`faults`)
    With no warm set yet, the copy's daemon runs with ``-v4``; CRIU then logs each fault as
    ``(SS.ssssss) uffd: <pid>-<uffd>: #PF at 0x<address>`` (``handle_page_fault`` in
    ``criu/uffd.c``, seen in CRIU 4.2.1's logs; ``pid`` is the task's pid in the image, as in
    ``pagemap-<pid>.img``; the stamp is seconds since the daemon started). Once the copy is
    resident, the faults of its first :data:`._warm.WINDOW` seconds, mapped through the
    image's pagemaps to ``(pages file, offset, 4096)``, are stored as the image's warm set
    (``_warm.save``). The log is the daemon's, in the copy's private
    work dir, but it is read as outside input anyway: bounded, lines that do not parse are
    skipped, every address must fall in a lazy present extent of that task, and the warm set
    is checked again when loaded.

Replaying (:func:`warm_image`)
    A later lazy restore of a *trusted* image with a warm set restores from a *warm image*: a
    private directory in the copy's work dir holding symlinks to the image's files (not hard
    links: linking changes a file's ctime, which the image's stamp vouches for), except each
    task pagemap naming warm pages, rewritten with those pages split out of their extents as
    no longer ``PE_LAZY``. ``criu restore`` then reads them itself from the pages file before
    the process resumes (``restore_priv_vma_content`` in ``criu/mem.c`` skips only ``PE_LAZY``
    entries) and the daemon, started on the same directory, neither waits for faults on them
    nor pushes them (``collect_iovs`` in ``criu/uffd.c`` takes only ``PE_LAZY`` entries). Pages
    file offsets are unchanged: present pages stay in entry order. The first request then finds
    its pages in memory instead of faulting each in through the daemon (~5,000 round trips for
    20 MiB). The pagemaps are read from the image after :meth:`Image.trusted` said its files are
    the ones hashed, and the caller checks that again once the warm image is made.
"""

from __future__ import annotations

import bisect
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import _safe
from .._engine import CriuEngine, RestoreResult
from .._images._criu_images import criu_images_pb2 as pb
from .._images._image import Image
from ._pagemap import (
    _HEADER,
    _U32,
    IMG_COMMON_MAGIC,
    PAGE_SIZE,
    PAGEMAP_MAGIC,
    PE_LAZY,
    Extent,
    Pagemap,
    load_pagemaps,
)
from ._source import Range

VERBOSE = "-v4"  # the daemon's log level that names each fault
_TASK_PAGEMAP = re.compile(r"pagemap-[1-9]\d{0,9}\.img")
_MAX_LOG = 64 << 20
_FAULT = re.compile(
    r"\((\d{1,9})\.(\d{6})\) (?:uffd: )?([1-9]\d{0,9})-\d{1,10}: #PF at 0x([0-9a-f]{1,16})\n"
)


def faults(log: Path, pagemaps: dict[int, Pagemap], *, window: float, limit: int) -> list[Range]:
    """The pages faulted in the first ``window`` seconds after the first fault logged in
    ``log`` (a ``-v4`` daemon log), in order, each once, at most ``limit`` bytes of them."""
    try:
        with open(log, "rb") as fh:
            raw = fh.read(_MAX_LOG)
    except OSError:
        return []
    out: list[Range] = []
    seen: set[Range] = set()
    first: float | None = None
    for m in _FAULT.finditer(raw.decode("ascii", errors="replace")):
        t = int(m.group(1)) + int(m.group(2)) / 1e6
        first = t if first is None else first
        if t - first > window or len(out) * PAGE_SIZE >= limit:
            break
        pm = pagemaps.get(int(m.group(3)))
        found = pm.lookup(int(m.group(4), 16), 1) if pm is not None else None
        if pm is None or found is None:
            continue  # not a lazy page of that task (or a line we misread)
        r = (pm.pages_file, found[0], PAGE_SIZE)
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def warm_image(image: Image, warm: Sequence[Range], into: Path) -> tuple[Path, int] | None:
    """A warm image of ``image`` in the new directory ``into`` (see the module docstring) and
    how many bytes of lazy pages it restores eagerly, or None if no warm page is lazy in it
    (nothing to gain)."""
    made = plan(image, warm)
    if made is None:
        return None
    link(image, into)
    fill(image, into, made[0])
    return into, made[1]


def plan(image: Image, warm: Sequence[Range]) -> tuple[dict[str, bytes], int] | None:
    """The task pagemaps of ``image`` that ``warm`` changes, rewritten (by file name), and how
    many bytes of lazy pages they make eager; None if no warm page is lazy."""
    pagemaps = load_pagemaps(image.path)
    pages: dict[str, set[int]] = defaultdict(set)
    for file, offset, length in warm:
        pages[file].update(range(offset, offset + length, PAGE_SIZE))
    rewritten: dict[str, bytes] = {}
    eager = 0
    for pid, pm in pagemaps.items():
        extents = _split(pm.extents, pages.get(pm.pages_file, set()))
        if extents is not None:
            rewritten[f"pagemap-{pid}.img"] = _encode(pm, extents)
            eager += sum(e.nr_pages for e in pm.extents if e.present and e.lazy)
            eager -= sum(e.nr_pages for e in extents if e.present and e.lazy)
    return (rewritten, eager * PAGE_SIZE) if rewritten else None


def link(image: Image, into: Path) -> None:
    """The new directory ``into`` with a symlink to each regular file of ``image`` but its task
    pagemaps (:func:`fill` adds those): all ``criu lazy-pages`` reads as it starts."""
    os.mkdir(into, 0o700)
    with _safe.opened_dir(image.path) as src, _safe.opened_dir(into) as dst:
        for name, st in sorted(_safe.lstat_entries(src).items()):
            if _is_regular(st) and not _TASK_PAGEMAP.fullmatch(name):
                os.symlink(image.path / name, name, dir_fd=dst)


def fill(image: Image, into: Path, rewritten: dict[str, bytes]) -> None:
    """The task pagemaps in ``into`` (made by :func:`link`): those ``rewritten``, written; the
    others, symlinks to ``image``'s."""
    with _safe.opened_dir(image.path) as src, _safe.opened_dir(into) as dst:
        for name, st in sorted(_safe.lstat_entries(src).items()):
            if name in rewritten:
                fd = _safe.create_file(dst, name, source=str(into))
                with os.fdopen(fd, "wb") as fh:
                    fh.write(rewritten[name])
            elif _is_regular(st) and _TASK_PAGEMAP.fullmatch(name):
                os.symlink(image.path / name, name, dir_fd=dst)


def _is_regular(st: os.stat_result) -> bool:
    return (st.st_mode & 0o170000) == 0o100000


def _split(extents: Sequence[Extent], warm: set[int]) -> list[Extent] | None:
    """``extents`` with the warm pages (pages file offsets) of lazy present extents split out
    as not lazy; None if none is."""
    offsets = sorted(warm)
    out: list[Extent] = []
    changed = False
    for e in extents:
        lo = bisect.bisect_left(offsets, e.offset)
        hi = bisect.bisect_left(offsets, e.offset + e.nr_pages * PAGE_SIZE)
        if not (e.present and e.lazy) or lo == hi:
            out.append(e)
            continue
        changed = True
        runs: list[list[int]] = []  # [first, end) page indices of warm runs in ``e``
        for off in offsets[lo:hi]:
            i = (off - e.offset) // PAGE_SIZE
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        pos = 0
        for first, end in runs:
            if first > pos:
                out.append(_part(e, pos, first, e.flags))
            out.append(_part(e, first, end, e.flags & ~PE_LAZY))
            pos = end
        if pos < e.nr_pages:
            out.append(_part(e, pos, e.nr_pages, e.flags))
    return out if changed else None


def _part(e: Extent, start: int, end: int, flags: int) -> Extent:
    """Pages ``start`` to ``end`` of ``e`` with ``flags``."""
    return Extent(e.vaddr + start * PAGE_SIZE, end - start, flags, e.offset + start * PAGE_SIZE)


def _encode(pm: Pagemap, extents: Sequence[Extent]) -> bytes:
    """``pagemap-<pid>.img`` of ``pm``'s pages file with ``extents``, as CRIU writes it: its
    ``pagemap.proto`` has ``vaddr`` and ``compat_nr_pages`` *required* (CRIU writes the latter
    0 and reads ``nr_pages``); a message without them fails ``criu restore`` (``Failed
    unpacking object``)."""
    head = pb.PagemapHead(pages_id=int(pm.pages_file[len("pages-") : -len(".img")]))
    entries = (
        pb.PagemapEntry(vaddr=e.vaddr, compat_nr_pages=0, flags=e.flags, nr_pages=e.nr_pages)
        for e in extents
    )
    parts = [_HEADER.pack(IMG_COMMON_MAGIC, PAGEMAP_MAGIC)]
    for msg in (head, *entries):
        data = msg.SerializeToString()
        parts += [_U32.pack(len(data)), data]
    return b"".join(parts)


class WarmEngine(CriuEngine):
    """CRIU for a lazy copy restored from its warm image: asked to restore the image's own
    directory (what the keeper asks), it restores the warm image, whose pagemaps the copy's
    daemon reads too. Asked for another directory (a derived image, see ``_process._copies``),
    it calls ``other_dir`` first (the copy's daemon is then started again on the image
    itself: daemon and restore must agree on what is lazy) and restores what was asked."""

    def __init__(
        self,
        binary: str,
        log_dir: Path,
        *,
        image: Path,
        warm: Path,
        other_dir: Callable[[], None],
        warm_fd: int | None = None,
    ) -> None:
        super().__init__(binary, log_dir=log_dir)
        self._image = image
        self._warm = warm
        self._warm_fd = warm_fd
        self._other_dir = other_dir

    def restore(self, images_dir: Path, *args: Any, **kwargs: Any) -> RestoreResult:
        """See :meth:`CriuEngine.restore`. ``warm_fd`` (the warm image's directory as the
        copy opened it, and its daemon reads it) is what CRIU restores when given."""
        if Path(images_dir) == self._image and kwargs.get("images_dir_fd") is None:
            images_dir = self._warm
            if self._warm_fd is not None:
                kwargs["images_dir_fd"] = self._warm_fd
        else:
            self._other_dir()
        return super().restore(images_dir, *args, **kwargs)
