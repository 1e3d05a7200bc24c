"""A real uvicorn server with in-memory state: ``uvicorn_app.py PORT``.

Every ``GET /`` answers ``<count> <host pid>``, the count going up by one per request: state a
restore or a checkpoint must carry on. ``GET /ready`` answers without counting. One worker, no
reload, access log off (the keeper's log would fill).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

count = 0


async def app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """The ASGI app."""
    global count
    if scope["type"] != "http":
        return
    if scope["path"] != "/ready":
        count += 1
    body = f"{count} {os.readlink('/proc/self')}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        access_log=False,
        log_level="warning",
        timeout_keep_alive=3600,
        lifespan="off",
    )
