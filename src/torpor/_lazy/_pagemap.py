"""CRIU's pagemap images, read for a lazy restore: which virtual pages of which task live where
in which ``pages-<id>.img``.

Facts relied on (CRIU 4.2 source):

- ``pagemap-<pid>.img`` is a protobuf image: the common magic ``0x54564319``, the pagemap magic
  ``0x56084025``, then entries each prefixed by a little-endian ``u32`` length. The first entry
  is ``pagemap_head {pages_id}`` naming ``pages-<pages_id>.img``; every further one is a
  ``pagemap_entry {vaddr, compat_nr_pages, in_parent, flags, nr_pages}``
  (``images/pagemap.proto``; the ``pages-*.img`` files are raw, no header: ``criu/image.c``'s
  ``open_pages_image_at``).
- An entry without ``nr_pages`` takes ``compat_nr_pages``; without ``flags`` it is
  ``PE_PRESENT``, or ``PE_PARENT`` when ``in_parent`` is set (``init_compat_pagemap_entry`` in
  ``criu/pagemap.c``). Flags: ``PE_PARENT=1`` (pages in the parent image), ``PE_LAZY=2`` (may be
  restored lazily), ``PE_PRESENT=4`` (bytes in the pages file) (``criu/include/pagemap.h``).
- The pages file holds the pages of the ``PE_PRESENT`` entries back to back, in entry order:
  ``skip_pagemap_pages``/``seek_pagemap`` advance the file offset only over present entries,
  and entries are sorted by address (``criu/pagemap.c``).
- A local dump marks private anonymous memory other than the stack ``PE_LAZY|PE_PRESENT``
  (``ppb_xfer_flags`` in ``criu/page-xfer.c``, ``generate_iovs`` in ``criu/mem.c``). With
  ``--lazy-pages`` ``criu restore`` skips the lazy entries and reads every other present page
  itself from the local pages file (``restore_priv_vma_content`` in ``criu/mem.c``); the
  ``lazy-pages`` daemon asks the page server only for lazy entries (``collect_iovs`` in
  ``criu/uffd.c``). Both open the pagemap and pages files in the image directory, so the pages
  file must exist there even when its lazy pages come from elsewhere.

Everything here is outside input: entries must be page-aligned, non-empty, sorted, not
overlapping and inside the address space, and a pagemap must not claim more bytes than its pages
file has. A request is answered only from one lazy, present entry (:meth:`Pagemap.lookup`).
"""

from __future__ import annotations

import bisect
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from .. import _safe
from .._errors import ImageCorruptedError
from .._images._criu_images import criu_images_pb2 as pb

PAGE_SIZE = 4096
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
_HEADER = struct.Struct("<II")
_U32 = struct.Struct("<I")
# x86-64 user space ends below 2**47 (2**56 with 5-level paging): an address past 2**57 is not
# one CRIU dumped.
_ADDR_LIMIT = 1 << 57
# A pagemap of 262144 areas (a raised vm.max_map_count) is a few MiB.
MAX_PAGEMAP = 32 << 20
_PAGEMAP_RE = re.compile(r"pagemap-([1-9][0-9]{0,9})\.img")


@dataclass(frozen=True)
class Extent:
    """One pagemap entry: ``nr_pages`` pages from ``vaddr``; ``offset`` is where they start in
    the pages file (meaningful only if :attr:`present`)."""

    vaddr: int
    nr_pages: int
    flags: int
    offset: int

    @property
    def end(self) -> int:
        """The first address past the extent."""
        return self.vaddr + self.nr_pages * PAGE_SIZE

    @property
    def present(self) -> bool:
        """Whether the pages are in the pages file."""
        return bool(self.flags & PE_PRESENT) and not self.flags & PE_PARENT

    @property
    def lazy(self) -> bool:
        """Whether CRIU leaves these pages to the lazy-pages daemon."""
        return bool(self.flags & PE_LAZY)


@dataclass(frozen=True)
class Pagemap:
    """The decoded ``pagemap-<pid>.img`` of one task."""

    pid: int
    pages_file: str
    extents: tuple[Extent, ...]

    @property
    def data_bytes(self) -> int:
        """How many bytes of the pages file the present extents use."""
        return sum(e.nr_pages * PAGE_SIZE for e in self.extents if e.present)

    def lookup(self, vaddr: int, nr_pages: int) -> tuple[int, int] | None:
        """``(file offset, pages)`` answering a request for ``nr_pages`` pages at ``vaddr``:
        at most ``nr_pages``, all inside the one lazy, present extent holding ``vaddr`` (CRIU's
        daemon accepts fewer pages than it asked for and asks again for the rest). None when
        ``vaddr`` is not page-aligned or in no such extent, or ``nr_pages`` is not positive."""
        if nr_pages <= 0 or vaddr % PAGE_SIZE or not 0 <= vaddr < _ADDR_LIMIT:
            return None
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i < 0:
            return None
        ext = self.extents[i]
        if vaddr >= ext.end or not (ext.present and ext.lazy):
            return None
        skip = (vaddr - ext.vaddr) // PAGE_SIZE
        return ext.offset + skip * PAGE_SIZE, min(nr_pages, ext.nr_pages - skip)

    @property
    def _starts(self) -> list[int]:
        # Cached by hand: the dataclass is frozen.
        starts: list[int] | None = self.__dict__.get("_starts_cache")
        if starts is None:
            starts = [e.vaddr for e in self.extents]
            object.__setattr__(self, "_starts_cache", starts)
        return starts

    def ranges(self, *, lazy: bool) -> list[tuple[int, int]]:
        """``(offset, length)`` of the pages file for the present extents that are lazy (or,
        with ``lazy=False``, those ``criu restore`` reads itself), adjacent ones merged."""
        out: list[tuple[int, int]] = []
        for e in self.extents:
            if not e.present or e.lazy != lazy:
                continue
            length = e.nr_pages * PAGE_SIZE
            if out and out[-1][0] + out[-1][1] == e.offset:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((e.offset, length))
        return out


def _error(image: Path | str, file: str, what: str) -> ImageCorruptedError:
    return ImageCorruptedError(
        f"image {image}: {file} {what}",
        image=image,
        file=file,
        hint="the image is damaged; checkpoint again",
    )


def parse_pagemap(
    data: bytes, *, pid: int, image: Path | str, pages_size: int | None = None
) -> Pagemap:
    """Decode the bytes of ``pagemap-<pid>.img``; :class:`ImageCorruptedError` for anything
    malformed (see the module docstring). ``pages_size`` is the size of its pages file, which
    the present extents must fit in."""
    name = f"pagemap-{pid}.img"
    if len(data) > MAX_PAGEMAP:
        raise _error(image, name, f"has {len(data)} bytes, more than {MAX_PAGEMAP}")
    if len(data) < _HEADER.size or _HEADER.unpack_from(data) != (IMG_COMMON_MAGIC, PAGEMAP_MAGIC):
        raise _error(image, name, "does not start with CRIU's pagemap magic")
    pos = _HEADER.size
    messages: list[bytes] = []
    while pos < len(data):
        if pos + _U32.size > len(data):
            raise _error(image, name, f"is truncated: partial entry length at offset {pos}")
        (size,) = _U32.unpack_from(data, pos)
        end = pos + _U32.size + size
        if end > len(data):
            raise _error(image, name, f"is truncated: the entry at offset {pos} runs past its end")
        messages.append(data[pos + _U32.size : end])
        pos = end
    if not messages:
        raise _error(image, name, "has no pagemap_head")
    head = pb.PagemapHead()
    try:
        head.ParseFromString(messages[0])
    except DecodeError as exc:
        raise _error(image, name, "has an undecodable pagemap_head") from exc
    if not head.HasField("pages_id"):
        raise _error(image, name, "has a pagemap_head without pages_id")
    extents: list[Extent] = []
    offset = 0
    prev_end = 0
    for i, raw in enumerate(messages[1:], start=1):
        pe = pb.PagemapEntry()
        try:
            pe.ParseFromString(raw)
        except DecodeError as exc:
            raise _error(image, name, f"has an undecodable entry {i}") from exc
        nr_pages = pe.nr_pages if pe.HasField("nr_pages") else pe.compat_nr_pages
        flags = pe.flags if pe.HasField("flags") else PE_PARENT if pe.in_parent else PE_PRESENT
        vaddr = pe.vaddr
        if vaddr % PAGE_SIZE or nr_pages <= 0 or vaddr + nr_pages * PAGE_SIZE > _ADDR_LIMIT:
            raise _error(image, name, f"entry {i} ({vaddr:#x}, {nr_pages} pages) is out of range")
        if vaddr < prev_end:
            raise _error(image, name, f"entry {i} at {vaddr:#x} is out of order or overlaps")
        ext = Extent(vaddr, nr_pages, flags, offset)
        if ext.present:
            offset += nr_pages * PAGE_SIZE
        prev_end = ext.end
        extents.append(ext)
    if pages_size is not None and offset > pages_size:
        raise _error(
            image, name, f"claims {offset} bytes of pages, its pages file has {pages_size}"
        )
    return Pagemap(pid, f"pages-{head.pages_id}.img", tuple(extents))


def load_pagemaps(image_dir: Path) -> dict[int, Pagemap]:
    """Every task's pagemap in the image directory ``image_dir`` (opened ``O_NOFOLLOW``, files
    read as regular files only), by pid; each checked against its pages file's size. A pagemap
    naming a missing pages file is refused."""
    source = str(image_dir)
    out: dict[int, Pagemap] = {}
    with _safe.opened_dir(image_dir) as dir_fd:
        entries = _safe.lstat_entries(dir_fd)
        for name in sorted(entries):
            m = _PAGEMAP_RE.fullmatch(name)
            if m is None:
                continue
            pid = int(m.group(1))
            data = _safe.read_regular(dir_fd, name, source=source, limit=MAX_PAGEMAP)
            pm = parse_pagemap(data, pid=pid, image=image_dir)
            try:
                fd = _safe.open_regular(dir_fd, pm.pages_file, source=source)
            except FileNotFoundError as exc:
                raise _error(image_dir, name, f"names {pm.pages_file}, which is missing") from exc
            try:
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if pm.data_bytes > size:
                raise _error(
                    image_dir, name, f"claims {pm.data_bytes} bytes of pages, "
                    f"{pm.pages_file} has {size}"
                )  # fmt: skip
            out[pid] = pm
    return out
