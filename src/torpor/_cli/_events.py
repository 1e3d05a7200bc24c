"""``torpor events``, ``torpor logs``: what happened to a supervised process, and its output."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add the commands."""
