"""A local lazy restore's daemon, started by the command before the keeper's restore begins.

With a kept warm image (``_warmcache``) nothing is left to do between the keeper's first look
at the copy and CRIU's restore but to wait for ``criu lazy-pages`` to listen: 5-8 ms here,
which nothing overlapped. When the command runs in the process that then hosts its keeper
(an agent worker: :func:`allow`), ``torpor restore IMAGE --lazy`` of one copy begins the
copy (:meth:`LazyCopy.begin <torpor._lazy._restore.LazyCopy.begin>`: its work dir and, for a
trusted image with a warm set, its daemon spawned on the warm image) as soon as the image is
open, and the keeper's restore takes it (:func:`take`) once it gets there: the daemon starts
while the names are reserved, the image's copies planned and its verdict reached.

Nothing here decides anything the keeper would not: the copy begun is the one the keeper's
``LazyCopies.start`` would begin for that very :class:`Image` object (same binary, same
rules: only a trusted image's warm image; the keeper's verdict on the image comes later and
governs as before); a daemon serves nothing until a restore connects to it. One not taken
(the command failed before its restore, or restored another way) is stopped and its work
dir removed (:func:`drop`, which the command calls whatever happens). A command SIGKILLed
before the keeper took it cannot: the daemon claimed the work dir as it was spawned, and the
next sweep (``torpor restore``, ``torpor ps``) kills it, idle, and removes the dir (``_sweep``).
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

from .._errors import TorporError

if TYPE_CHECKING:
    from .._images._image import Image
    from ._restore import LazyCopy

_allowed = False
_begun: tuple[Image, str, LazyCopy] | None = None


def allow(on: bool = True) -> None:
    """This process hosts the keeper of its next command (``_agent._worker``): a daemon it
    starts is the keeper's child, which the keeper's watch needs."""
    global _allowed
    _allowed = on


def begin(new: type[LazyCopy], image: Image, name: str, binary: str) -> None:
    """Begin the lazy copy ``name`` of the local ``image`` now (``new`` is
    :class:`~torpor._lazy._restore.LazyCopy`, passed in: ``_restore`` imports this module), if
    this process may (see the module docstring). A failure is not one: the keeper begins the
    copy itself."""
    global _begun
    if not _allowed or _begun is not None:
        return
    copy = new(image, name, binary=binary)
    try:
        spawned = copy.begin()
    except (OSError, TorporError):
        _discard(copy)
        return
    if not spawned:
        _discard(copy)
        return
    _begun = (image, binary, copy)


def take(image: Image, binary: str) -> LazyCopy | None:
    """The copy :func:`begin` began for this very ``image`` object and ``binary``, handed
    over once (its daemon spawned, not yet waited for), or None."""
    global _begun
    if _begun is None or _begun[0] is not image or _begun[1] != binary:
        return None
    copy = _begun[2]
    _begun = None
    return copy


def drop() -> None:
    """Stop the copy begun and not taken (its daemon killed, its work dir removed)."""
    global _begun
    if _begun is not None:
        copy, _begun = _begun[2], None
        _discard(copy)


def _discard(copy: LazyCopy) -> None:
    copy.abort()
    if copy.work_dir is not None:
        shutil.rmtree(copy.work_dir, ignore_errors=True)
