"""The local images: the store (image directories under ``<home>/images``, addressed by name)
and every image torpor made elsewhere (``-o`` paths and the like, remembered in the image
index, :mod:`._index`), addressed by path.

:func:`list_all` is what ``torpor images`` shows: each image with its state — :data:`OK`,
:data:`INCOMPLETE` (a checkpoint could not finish it: ``torpor image repair``),
:data:`BROKEN` (torpor refuses it, and says why in one line) or :data:`MISSING` (an indexed
image whose directory's parent is gone too, e.g. an unmounted disk). An indexed image whose
directory vanished from a parent that is still there was deleted: its entry is dropped.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import _paths
from .._errors import (
    ImageError,
    ImageNotFoundError,
    TorporError,
    UnsafePathError,
    UsageError,
)
from . import _incomplete, _index, _manifest
from ._image import STAGING_MARK, Image
from ._incomplete import IncompleteImageError, Leftover

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

OK = "ok"
INCOMPLETE = _incomplete.INCOMPLETE
BROKEN = "broken"
MISSING = "missing"


def check_name(name: str, *, what: str = "image name") -> str:
    """Return ``name`` if valid (letters, digits, ``._-``, no path parts), else raise."""
    if not _NAME_RE.match(name) or ".." in name:
        raise UsageError(
            f"invalid {what} {name!r}",
            hint="use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def default_path(name: str) -> Path:
    """Where ``torpor checkpoint --name NAME`` puts a local image."""
    return _paths.images_dir() / check_name(name)


def is_path(arg: str) -> bool:
    """Whether ``arg`` names an image by path (a ``/``, or an existing directory) rather
    than by its name in the store."""
    return "/" in arg or arg in (".", "..") or Path(arg).is_dir()


def resolve(arg: str) -> Path:
    """The directory of the image named or pointed to by ``arg``.

    A value with a ``/`` (or naming an existing directory) is a path; otherwise it is the name
    of a local image. An image a checkpoint could not finish is an
    :class:`IncompleteImageError` whose hint is the repair.
    """
    if is_path(arg):
        path = Path(arg).absolute()
        if not path.is_dir():
            _refuse_unfinished(arg, path.parent, lambda left: left.record.dest == path.name)
            raise ImageNotFoundError(f"no image directory {path}", image=arg)
        if _incomplete.is_staging_name(path.name):
            _refuse_unfinished(arg, path.parent, lambda left: left.path == path)
        return path
    path = _paths.images_dir() / check_name(arg)
    if not path.is_dir():
        _refuse_unfinished(
            arg, path.parent, lambda left: arg in (left.record.dest, left.record.name)
        )
        raise ImageNotFoundError(
            f"no local image named {arg!r}",
            image=arg,
            hint="`torpor images` lists local images; give a path for an image elsewhere",
        )
    return path


def _refuse_unfinished(arg: str, parent: Path, match: Callable[[Leftover], bool]) -> None:
    """Raise if a checkpoint of the image ``arg`` left it unfinished in ``parent``."""
    for left in _incomplete.scan(parent):
        if not match(left):
            continue
        if left.state == _incomplete.INCOMPLETE:
            raise IncompleteImageError(
                f"image {arg!r} is incomplete: its checkpoint could not finish it (kept at "
                f"{left.path})",
                image=left.path,
                hint=f"`torpor image repair {arg}` finishes it",
            )
        if left.state == _incomplete.IN_USE:
            raise ImageNotFoundError(
                f"image {arg!r} is still being written (at {left.path})",
                image=arg,
                hint="wait for its checkpoint to end",
            )


def list_local() -> list[Image]:
    """Every complete image in the local store, oldest first (partial ones are skipped, and so
    are entries that are not images or that torpor refuses to open: symlinks, directories
    another user could change, damaged manifests)."""
    images: list[Image] = []
    root = _paths.images_dir()
    for entry in os.scandir(root):
        if not entry.is_dir(follow_symlinks=False) or STAGING_MARK in entry.name:
            continue
        try:
            images.append(Image.open(entry.path))
        except (ImageError, UnsafePathError):
            continue
    return sorted(images, key=lambda i: i.manifest.created)


# -- every local image -------------------------------------------------------------------------


@dataclass(frozen=True)
class Listed:
    """One local image as ``torpor images`` shows it: ``path`` is its directory (an
    incomplete image's staging directory), ``state`` one of :data:`OK`, :data:`INCOMPLETE`,
    :data:`BROKEN`, :data:`MISSING`; ``image`` is set when OK, ``leftover`` when incomplete,
    ``problem`` (one line) when broken."""

    path: Path
    state: str
    name: str
    image: Image | None = None
    leftover: Leftover | None = None
    problem: str | None = None

    @property
    def created(self) -> str | None:
        """When it was made (None if unknown)."""
        if self.image is not None:
            return self.image.manifest.created
        return self.leftover.record.created if self.leftover is not None else None


@dataclass(frozen=True)
class Listing:
    """What :func:`list_all` found: the images, and a line for each index entry it skipped."""

    images: tuple[Listed, ...]
    problems: tuple[str, ...]


def list_all() -> Listing:
    """Every local image: the store's and the indexed ones, oldest first (broken and missing
    ones last). Leftovers of dumps that never succeeded are removed on the way
    (:func:`~torpor._images._incomplete.sweep`), and index entries of deleted images
    dropped."""
    store = _paths.images_dir()
    rows: list[Listed] = []
    try:
        names = sorted(os.listdir(store))
    except OSError:
        names = []
    for name in names:
        if not _incomplete.is_staging_name(name):
            rows.append(look(store / name))
    rows.extend(_incomplete_rows(_incomplete.sweep(store)))
    found = _index.entries()
    kept: dict[Path, list[Leftover]] = {}  # each parent swept once
    seen = {row.path for row in rows}
    for path in found.paths:
        if path in seen or _index.in_store(path):
            continue
        seen.add(path)
        if os.path.lexists(path):
            rows.append(look(path))
            continue
        if path.parent not in kept:
            kept[path.parent] = _incomplete.sweep(path.parent)
        lefts = [left for left in kept[path.parent] if left.record.dest == path.name]
        if lefts or _staged(path):
            rows.extend(_incomplete_rows(lefts))  # in use: listed once finished
        elif path.parent.is_dir():
            _index.forget(path)  # deleted
        else:
            rows.append(Listed(path, MISSING, path.name))
    return Listing(tuple(sorted(rows, key=_order)), found.problems)


def _order(row: Listed) -> tuple[bool, str, str]:
    created = row.created
    return (created is None, created or "", str(row.path))


def _incomplete_rows(lefts: Iterable[Leftover]) -> list[Listed]:
    return [
        Listed(left.path, INCOMPLETE, left.record.name, leftover=left)
        for left in lefts
        if left.state == _incomplete.INCOMPLETE
    ]


def _staged(path: Path) -> bool:
    """Whether a staging directory for ``path`` is beside it (a dump may be writing it)."""
    try:
        return any(n.startswith(f".{path.name}{STAGING_MARK}") for n in os.listdir(path.parent))
    except OSError:
        return False


def look(path: Path) -> Listed:
    """The image directory ``path`` as listed: :data:`OK` if torpor opens it (its manifest,
    signature and files as listed; nothing is hashed), else :data:`BROKEN` with why (named
    by its manifest if that much can be read)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Listed(path, MISSING, path.name)
    except OSError as exc:
        return Listed(path, BROKEN, path.name, problem=f"cannot be read: {exc.strerror}")
    if stat.S_ISLNK(st.st_mode):
        return Listed(path, BROKEN, path.name, problem="is a symlink, not a directory")
    if not stat.S_ISDIR(st.st_mode):
        return Listed(path, BROKEN, path.name, problem="is not a directory")
    try:
        image = Image.open(path)
    except TorporError as exc:
        return Listed(path, BROKEN, _name_of(path), problem=reason(exc, path))
    except OSError as exc:
        return Listed(path, BROKEN, _name_of(path), problem=f"cannot be read: {exc.strerror}")
    return Listed(path, OK, image.name, image=image)


def _name_of(path: Path) -> str:
    """The name a refused image's manifest gives it, if it has one that parses (else its
    directory's name)."""
    try:
        return _manifest.read(path).name
    except (OSError, TorporError):
        return path.name


def reason(exc: TorporError, path: Path) -> str:
    """Why ``exc`` refused the image at ``path``, in one line without the path (the listing
    shows it beside)."""
    where = re.escape(str(path))
    msg = " ".join(exc.msg.split())
    prefix = rf"image '[^']*' \({where}\)( is corrupted)?:? |image (directory )?{where}:? "
    return re.sub(rf"^({prefix}|{where}:? )", "", msg)
