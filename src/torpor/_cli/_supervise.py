"""``torpor stop``, ``supervise``, ``unsupervise``, ``resume``, ``supervisor``: supervision."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add the commands."""
