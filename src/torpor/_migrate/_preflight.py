"""Pre-flight: what the target of a migration checks before the source freezes anything.

The source sends :func:`facts` (its CRIU, its kernel, the process's name and size); the target
answers with :func:`problems`, each one line saying what is wrong and where. Only when the list
is empty does the source dump: a refused migration leaves the process untouched.

Checked so far: the target's CRIU is at least the source's (an image is read by a CRIU as new
as the one that wrote it), its kernel release is at least the source's (restoring on an older
kernel can lack what the image uses), the name is free there, and the images directory has room
for an image of the process's size. CPU features (CRIU's cpuinfo dump/check), the process's
open files and its addresses are later work (issue 9).
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from typing import Any

from .. import _paths
from .._engine import criu_version
from .._errors import ProcessNotFoundError, TorporError
from .._images._store import check_name
from .._process import _registry

# The image is about the process's resident memory; some room beyond it for CRIU's other files.
_ROOM_FACTOR = 1.1
_ROOM_EXTRA = 16 << 20


MODES = ("copy", "lazy", "pool")  # how memory moves: torpor migrate --mode


def facts(name: str, rss_bytes: int, *, mode: str = "copy") -> dict[str, Any]:
    """What the source tells the target in its ``preflight`` message."""
    return {
        "type": "preflight",
        "mode": mode,
        "name": name,
        "criu": criu_version(),
        "kernel": platform.release(),
        "rss_bytes": rss_bytes,
    }


def version_tuple(text: str) -> tuple[int, ...]:
    """The leading dotted numbers of a version (``6.18.1-amd64`` -> ``(6, 18, 1)``)."""
    m = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def problems(msg: Mapping[str, Any], *, where: str) -> list[str]:
    """What keeps this host (``where``, as the source knows it) from taking the migration
    ``msg`` describes; empty if nothing. ``msg`` comes from the peer: every field is checked."""
    out: list[str] = []
    name, mode = msg.get("name"), msg.get("mode")
    src_criu, src_kernel, rss = msg.get("criu"), msg.get("kernel"), msg.get("rss_bytes")
    if mode not in MODES:
        out.append(f"mode {mode!r} is not served on {where} (only {', '.join(MODES)})")
    if not isinstance(src_criu, str) or not isinstance(src_kernel, str):
        return [*out, "the pre-flight message lacks the source's CRIU and kernel versions"]
    if not isinstance(rss, int) or isinstance(rss, bool) or rss < 0:
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
    images = _paths.images_dir()
    st = os.statvfs(images)
    free = st.f_bavail * st.f_frsize
    need = int(rss * _ROOM_FACTOR) + _ROOM_EXTRA
    if free < need:
        out.append(
            f"{images} on {where} has {free >> 20} MiB free; an image of this process needs "
            f"about {need >> 20} MiB"
        )
    return out
