"""Which pool is the source's: the pool identity of ``torpor migrate --mode pool`` (a leaf of
:mod:`._viapool`, which pre-flight also calls, so it imports neither pre-flight nor the copy
mode).

A pool is named on every host that reaches it by its driver and the SHA-256 of its
``torpor-pool.json`` marker (:func:`identity`); the target finds the pool configured there
whose marker is the same bytes (:func:`local_pool`), each read in a child process with a
deadline (librados' connect can hang for minutes).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from .._errors import TorporError

if TYPE_CHECKING:
    from .._pools import Pool

MAX_POOLS = 16  # configured pools a target opens to find the source's
LOOKUP_TIMEOUT = 20.0  # seconds pre-flight may spend opening them
_HEX64 = re.compile(r"[0-9a-f]{64}")
# The pool pre-flight found for the message it checked (one migration at a time per server).
_found: dict[str, str] = {}


# -- the pool's identity -------------------------------------------------------------------------


def identity(pool: Pool, driver: str) -> dict[str, str]:
    """What names ``pool`` on every host that reaches it: its driver and the SHA-256 of its
    format marker (the bytes torpor wrote there once, when the pool was first opened)."""
    from .._pools._reader import MAX_META, META_KEY

    return {
        "name": pool.name,
        "driver": driver,
        "marker": hashlib.sha256(pool.backend.get(META_KEY, limit=MAX_META)).hexdigest(),
    }


def local_pool(ident: object, *, where: str) -> tuple[str | None, list[str]]:
    """The pool configured here that is the source's pool ``ident`` (as the peer sent it),
    and the problems met: (name, []) when found, (None, [why]) when not."""
    from .._pools import list_configs

    if not isinstance(ident, dict) or set(ident) != {"name", "driver", "marker"}:
        return None, ["the pre-flight message does not say which pool the image goes through"]
    name, driver, marker = ident["name"], ident["driver"], ident["marker"]
    if not (isinstance(name, str) and isinstance(driver, str) and isinstance(marker, str)):
        return None, ["the pre-flight message names its pool badly"]
    if not _HEX64.fullmatch(marker) or len(name) > 64 or len(driver) > 16:
        return None, ["the pre-flight message names its pool badly"]
    shown = f"{name!r} ({driver})"
    try:
        configs = [c for c in list_configs() if c.driver == driver]
    except (OSError, TorporError) as exc:
        return None, [f"the pools of {where} cannot be listed: {_why(exc)}"]
    # The one of the same name first: usually the hosts call the shared pool alike.
    configs.sort(key=lambda c: c.name != name)
    unreachable: list[str] = []
    deadline = time.monotonic() + LOOKUP_TIMEOUT
    for cfg in configs[:MAX_POOLS]:
        mine, why = _marker_of(cfg.name, deadline - time.monotonic())
        if mine == marker:
            return cfg.name, []
        if why is not None:
            unreachable.append(f"pool {cfg.name!r} there cannot be read: {why}")
    found = f"no pool configured on {where} is the source's pool {shown}"
    if unreachable:
        found += f" ({'; '.join(unreachable)})"
    return None, [f"{found}: configure it there (torpor pool create) where it can be read"]


def _marker_of(pool: str, seconds: float) -> tuple[str | None, str | None]:
    """The marker of the configured pool ``pool`` (see :func:`identity`), read by a child
    process given ``seconds``: a cluster that cannot be reached can hang librados' connect
    for minutes whatever timeout it is given, and pre-flight must answer. (marker, None), or
    (None, why it could not be read)."""
    if seconds <= 0:
        return None, "no time was left to open it"
    code = "import sys; from torpor._migrate import _poolident as p; p._print_marker(sys.argv[1])"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, pool], stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=seconds, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, f"it did not answer within {seconds:.0f} s"
    except OSError as exc:
        return None, str(exc.strerror or exc)
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        return (str(answer["marker"]), None) if "marker" in answer else (None, str(answer["error"]))
    except (ValueError, IndexError, KeyError, TypeError):
        return None, f"its reader failed ({done.stderr.strip()[-200:] or done.returncode})"


def _print_marker(pool: str) -> None:
    """:func:`_marker_of`'s child: print ``{"marker": ...}`` or ``{"error": ...}``."""
    from .._pools import load_config, open_pool

    try:
        with open_pool(pool) as opened:
            answer = {"marker": identity(opened, load_config(pool).driver)["marker"]}
    except (OSError, TorporError, KeyError) as exc:
        answer = {"error": _why(exc)}
    print(json.dumps(answer), flush=True)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TorporError):
        return exc.msg
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return repr(exc)


def pool_problems(ident: object, *, where: str) -> list[str]:
    """Pre-flight's pool check (mode pool): empty if a pool here is the source's. What it
    found is kept for :func:`serve_pool`, which this server runs next for the same message
    (looking again would cost the restore a child process per pool, while the source waits
    frozen)."""
    found, problems = local_pool(ident, where=where)
    _found.clear()
    if found is not None:
        _found[json.dumps(ident, sort_keys=True)] = found
    return problems
