"""``torpor migrate --mode lazy``: post-copy migration (issue 9). Not built yet."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .._errors import TorporError

if TYPE_CHECKING:
    from ._copy import Summary
    from ._serve import _Incoming


def migrate_lazy(
    name: str,
    host: str,
    port: int,
    *,
    timeout: float,
    tcp_established: bool,
    say: Callable[[str], None] | None = None,
) -> Summary:
    """The source's side of a lazy migration."""
    raise TorporError("--mode lazy is not built yet", hint="use --mode copy")


def serve_lazy(incoming: _Incoming, name: str, first: Mapping[str, Any]) -> None:
    """The target's side, after pre-flight passed and ``ready`` was sent."""
    raise TorporError("--mode lazy is not served here yet")
