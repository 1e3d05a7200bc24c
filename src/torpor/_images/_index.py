"""The image index: where torpor made images outside the local store, so ``torpor images``
lists every image torpor made.

Images under ``<home>/images`` are found by listing that directory. Every other image
directory torpor makes — ``torpor checkpoint -o PATH``, a self-dump to a path, an image kept in
the cache when its push failed, a repair under a new name — is remembered here, in
``<home>/index`` (0700): one small file per image, ``<hash>.json`` holding
``{"path": "/abs/path"}``, where ``<hash>`` is the first 32 hex digits of the SHA-256 of the
path. An entry is written before CRIU starts (:func:`add`), so an image that could not be
finished is listed too, and forgotten (:func:`forget`) when the image is deleted.

The index is outside input like the rest of the home: entries are read ``O_NOFOLLOW``, regular
files of a bounded size only, and must be exactly what :func:`add` writes (an absolute,
normalised path; the file named by its hash). Anything else is reported and skipped
(:func:`entries`), never followed. Entries say only *where* to look: what is there is checked
as any image is (:class:`~torpor._images._image.Image`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import _paths
from .._errors import TorporError
from .._safe import lstat_entries, opened_dir, read_regular, replace_file

INDEX_DIR = "index"
_SUFFIX = ".json"
_MAX_ENTRY = 8192
_MAX_PATH = 4096


@dataclass(frozen=True)
class Entries:
    """What the index holds: the image paths, in the order they were added, and one line per
    entry that is not one :func:`add` wrote (skipped)."""

    paths: tuple[Path, ...]
    problems: tuple[str, ...]


def index_dir() -> Path:
    """``<home>/index`` (created 0700; refused if another user could change it)."""
    return _paths.private_dir(_paths.home() / INDEX_DIR, what="image index")


def normal(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute and normalised (no ``.``, ``..`` or doubled slashes)."""
    return Path(os.path.normpath(os.path.abspath(path)))


def entry_name(path: Path) -> str:
    """The name of the index entry of the normalised absolute ``path``."""
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()
    return f"{digest[:32]}{_SUFFIX}"


def in_store(path: Path) -> bool:
    """Whether ``path`` is directly in the local store (listed without the index)."""
    try:
        parent = os.stat(path.parent)
        store = os.stat(_paths.images_dir())
    except (OSError, TorporError):
        return False
    return (parent.st_dev, parent.st_ino) == (store.st_dev, store.st_ino)


def add(path: str | os.PathLike[str]) -> None:
    """Remember the image directory ``path`` (an image in the local store needs no entry).
    Idempotent; the entry is written whole or not at all (``O_EXCL`` temporary, renamed)."""
    p = normal(path)
    if in_store(p):
        return
    data = json.dumps({"path": str(p)}).encode()
    with opened_dir(index_dir()) as fd:
        replace_file(fd, entry_name(p), data, source="image index")


def try_add(path: str | os.PathLike[str]) -> str | None:
    """:func:`add`, best effort: None, or why the entry could not be written (a dump must not
    fail for its listing)."""
    try:
        add(path)
    except (OSError, TorporError) as exc:
        return str(exc)
    return None


def forget(path: str | os.PathLike[str]) -> bool:
    """Drop the entry of ``path``; whether there was one."""
    p = normal(path)
    with opened_dir(index_dir()) as fd:
        try:
            os.unlink(entry_name(p), dir_fd=fd)
        except FileNotFoundError:
            return False
    return True


def known(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has an entry (as :func:`add` wrote it)."""
    p = normal(path)
    where = index_dir()
    with opened_dir(where) as fd:
        problem, found = _check(fd, entry_name(p), where)
    return problem is None and found == p


def entries() -> Entries:
    """Every valid entry's path (oldest first) and a line for each invalid one."""
    paths: list[tuple[int, str, Path]] = []
    problems: list[str] = []
    where = index_dir()
    with opened_dir(where) as fd:
        for name, st in sorted(lstat_entries(fd).items()):
            if name.startswith("."):
                continue  # a temporary file of an interrupted add
            problem, path = _check(fd, name, where)
            if problem is not None:
                problems.append(f"index entry {where / name} {problem}; ignored")
            elif path is not None:
                paths.append((st.st_mtime_ns, name, path))
    return Entries(tuple(p for _, _, p in sorted(paths)), tuple(problems))


def _check(fd: int, name: str, where: Path) -> tuple[str | None, Path | None]:
    """(why the entry ``name`` is not one :func:`add` wrote, or None; its path)."""
    try:
        raw = read_regular(fd, name, source=str(where), limit=_MAX_ENTRY)
    except FileNotFoundError:
        return None, None  # forgotten meanwhile
    except (OSError, TorporError) as exc:
        return f"cannot be read ({getattr(exc, 'msg', None) or exc})", None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return "is not JSON", None
    value = data.get("path") if isinstance(data, dict) and set(data) == {"path"} else None
    if not isinstance(value, str):
        return 'is not {"path": PATH}', None
    if (
        not value.startswith("/")
        or "\0" in value
        or len(value.encode(errors="surrogatepass")) > _MAX_PATH
        or os.path.normpath(value) != value
        or value == "/"
    ):
        return f"holds {value[:80]!r}, not a normalised absolute path", None
    path = Path(value)
    if entry_name(path) != name:
        return f"names {value[:80]!r}, whose entry has another name", None
    return None, path
