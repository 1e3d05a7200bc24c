"""The local image store: image directories under ``<home>/images``, addressed by name or path."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import _paths
from .._errors import ImageError, ImageNotFoundError, UnsafePathError, UsageError
from ._image import STAGING_MARK, Image

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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


def resolve(arg: str) -> Path:
    """The directory of the image named or pointed to by ``arg``.

    A value with a ``/`` (or naming an existing directory) is a path; otherwise it is the name
    of a local image.
    """
    if "/" in arg or arg in (".", "..") or Path(arg).is_dir():
        path = Path(arg).absolute()
        if not path.is_dir():
            raise ImageNotFoundError(f"no image directory {path}", image=arg)
        return path
    path = _paths.images_dir() / check_name(arg)
    if not path.is_dir():
        raise ImageNotFoundError(
            f"no local image named {arg!r}",
            image=arg,
            hint="`torpor images` lists local images; give a path for an image elsewhere",
        )
    return path


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
