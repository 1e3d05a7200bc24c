"""Fuzzing export archives (``torpor image import FILE``): random bytes, and real exports
rebuilt with hostile members — names ``../x``, absolute ones, ``images/../..``; symlinks and
hard links (to root-only files, out of the home), devices, FIFOs, directories; a header that
claims more bytes than follow; a name twice; members dropped or reordered; manifests and
chunk lists given hostile values.

Reading, importing (API and CLI) and pulling the imported image end with success or a
:class:`~torpor.TorporError`, in bounded time, and nothing is written outside the home.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tarfile
from typing import Any

import zstandard
from hypothesis import example, given
from hypothesis import strategies as st

from torpor import TorporError
from torpor._cli import main
from torpor._pools import MemoryBackend, Pool
from torpor._pools._archive import ArchiveReader

from .support import (
    HOSTILE_INTS,
    OUT,
    Jail,
    bounded,
    escaping_names,
    in_child,
    mutated_json,
    scaled,
    verdict,
)
from .test_fuzz_pool import FAST, NAME, base_objects, memory_pool

Member = dict[str, Any]


@functools.cache
def base_members() -> tuple[tuple[str, bytes], ...]:
    """The members of a real export of the base image, in order."""
    with Jail():
        buf = io.BytesIO()
        memory_pool(dict(base_objects())).export_image(NAME, buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        out = []
        for m in tar.getmembers():
            fh = tar.extractfile(m)
            assert fh is not None
            out.append((m.name, fh.read()))
        return tuple(out)


TYPES = {
    "file": tarfile.REGTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "dir": tarfile.DIRTYPE,
    "contiguous": tarfile.CONTTYPE,
}

LINKS = st.sampled_from(
    ["/etc/shadow", "/dev/zero", f"{OUT}/sentinel", "../../../x", "images/web", "torpor-pool.json"]
)


def member_names() -> st.SearchStrategy[str]:
    real = [n for n, _ in base_members()]
    return st.one_of(
        st.sampled_from(real),
        escaping_names(),
        st.sampled_from(["/etc/passwd", "images/../../x", "images/", "packs//x", "./images/web"]),
        st.builds(lambda n: "images/" + n, escaping_names()),
        st.text(max_size=30),
    )


def _document(data: bytes, *, packed: bool) -> Any:
    """The JSON document a member holds (zstd-compressed if ``packed``), or None."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data) if packed else data
        return json.loads(raw)
    except (zstandard.ZstdError, ValueError):
        return None


@st.composite
def members(draw: st.DrawFn) -> list[Member]:
    """A real export's members, changed."""
    out: list[Member] = [{"name": n, "data": d, "type": "file"} for n, d in base_members()]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(["add", "add", "retype", "content", "drop", "dup", "lie", "swap"])
        )
        if op == "add" or not out:
            out.insert(
                draw(st.integers(0, len(out))),
                {
                    "name": draw(member_names()),
                    "type": draw(st.sampled_from(sorted(TYPES))),
                    "link": draw(LINKS),
                    "data": draw(st.binary(max_size=32)),
                },
            )
            continue
        i = draw(st.integers(0, len(out) - 1))
        m = out[i]
        if op == "retype":
            out[i] = {**m, "type": draw(st.sampled_from(sorted(TYPES))), "link": draw(LINKS)}
        elif op == "content":
            packed = m["name"].startswith("images/")
            doc = _document(m["data"], packed=packed)
            if doc is not None:
                blob = json.dumps(draw(mutated_json(doc))).encode()
                new = zstandard.ZstdCompressor().compress(blob) if packed else blob
            else:
                new = draw(st.binary(max_size=64))
            out[i] = {**m, "data": new}
        elif op == "drop":
            del out[i]
        elif op == "dup":
            out.insert(draw(st.integers(0, len(out))), {**m, "data": draw(st.binary(max_size=16))})
        elif op == "lie":
            out[i] = {**m, "size": draw(HOSTILE_INTS.filter(lambda n: 0 <= n < 8**11))}
        else:
            j = draw(st.integers(0, len(out) - 1))
            out[i], out[j] = out[j], out[i]
    return out


def tar_bytes(jail: Jail, spec: list[Member]) -> bytes:
    """The tar stream ``spec`` describes (headers written by tarfile, sizes possibly lying)."""
    buf = io.BytesIO()
    for m in spec:
        info = tarfile.TarInfo(jail.fill(m["name"]))
        info.type = TYPES[m["type"]]
        info.mode = 0o600
        data = m["data"] if m["type"] in ("file", "contiguous") else b""
        info.size = m.get("size", len(data))
        if m["type"] in ("symlink", "hardlink"):
            info.linkname = jail.fill(m["link"])
        if m["type"] in ("chardev", "blockdev"):
            info.devmajor, info.devminor = 1, 5  # /dev/zero
        try:
            buf.write(info.tobuf(tarfile.GNU_FORMAT))
        except (ValueError, UnicodeError):
            continue  # a name tarfile itself cannot write
        buf.write(data)
        buf.write(bytes(-len(data) % tarfile.BLOCKSIZE))
    buf.write(bytes(2 * tarfile.BLOCKSIZE))
    return buf.getvalue()


def test_the_untouched_export_imports() -> None:
    spec = [{"name": n, "data": d, "type": "file"} for n, d in base_members()]
    jail = Jail()
    archive = jail.inputs / "fuzz.torpor"
    archive.write_bytes(tar_bytes(jail, spec))
    with jail:
        pool = Pool("to", MemoryBackend(), timing=FAST)
        pool.import_image(io.BytesIO(archive.read_bytes()), "again")
        assert [i.name for i in pool.list_images()] == ["again"]

        def by_cli() -> None:
            os.environ["TORPOR_DEBUG"] = "1"
            assert main(["image", "import", str(archive), "--name", "imported"]) == 0
            assert main(["image", "pull", "imported"]) == 0

        assert in_child(by_cli) == {"kind": "ok"}


def read_all(data: bytes) -> None:
    """Open the archive and read every member it admits."""
    reader = ArchiveReader(io.BytesIO(data), source="fuzz.torpor")
    try:
        for key in list(reader.list()):
            with contextlib.suppress(KeyError):
                reader.get(key)
            reader.size(key)
    finally:
        reader.close()


@given(st.binary(max_size=2048))
@example(bytes(1024))
@example(b"\0" * 511 + b"x")
def test_random_bytes(data: bytes) -> None:
    with Jail(), bounded():
        verdict(lambda: read_all(data))
        verdict(lambda: Pool("to", MemoryBackend(), timing=FAST).import_image(io.BytesIO(data)))


@scaled(0.5)
@given(members())
def test_reader(spec: list[Member]) -> None:
    with Jail() as jail:
        data = tar_bytes(jail, spec)
        with bounded():
            verdict(lambda: read_all(data))


def import_and_pull(path: str) -> None:
    """``torpor image import FILE`` then ``torpor image pull`` of what it stored."""
    os.environ["TORPOR_DEBUG"] = "1"  # an unexpected error raises instead of exit 70
    if main(["image", "import", path, "--name", "imported"]) == 0:
        assert main(["image", "pull", "imported"]) in (0, 1)
    with contextlib.suppress(TorporError), open(path, "rb") as fh:
        Pool("to", MemoryBackend(), timing=FAST).import_image(fh)


@scaled(0.5)
@given(members())
def test_import_and_pull(spec: list[Member]) -> None:
    jail = Jail()
    archive = jail.inputs / "fuzz.torpor"  # written before the jail's snapshot
    archive.write_bytes(tar_bytes(jail, spec))
    with jail:
        in_child(lambda: import_and_pull(str(archive)), seconds=8)
