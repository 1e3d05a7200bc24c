"""What a forked keeper reports, over a pipe, to the command that forked it.

The report is a first line, ``<pid> <start time>`` (written at once: if the keeper dies before
its reply, the command still knows which keeper to clean up after, see
:func:`torpor._process._keeper.spawn`), then one JSON reply, ``{"ok": true, "procs": [...]}``
with the records of what it started, or ``{"ok": false, "error": ...}``. An error crosses as
its class name and plain fields and is rebuilt as the same :class:`TorporError` subclass;
anything else crosses as a ``TorporError`` saying the keeper failed. (``_migrate._apart``
sends errors across its own fork the same way.)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from .. import _errors
from .._errors import TorporError
from ._proc import ProcRef
from ._registry import ManagedProcess


def first_line(pid: int, born: int) -> bytes:
    """The report's first line: the keeper's pid and start time."""
    return b"%d %d\n" % (pid, born)


def keeper_of(line: bytes) -> ProcRef:
    """The keeper named by a report's first line (without its newline); ValueError if the
    line is not one."""
    pid, born = (int(x) for x in line.split())
    return ProcRef(pid, born)


def ok_reply(procs: list[ManagedProcess]) -> bytes:
    """The reply of a keeper whose work produced the records ``procs``."""
    return json.dumps({"ok": True, "procs": [asdict(p) for p in procs]}).encode()


def error_reply(exc: BaseException) -> bytes:
    """The reply of a keeper whose work raised ``exc``."""
    return json.dumps({"ok": False, "error": encode_error(exc)}).encode()


def read_reply(data: bytes) -> list[ManagedProcess]:
    """The records of an :func:`ok_reply`, or raise the error of an :func:`error_reply`."""
    reply = json.loads(data)
    if not reply["ok"]:
        raise decode_error(reply["error"])
    procs = []
    for d in reply["procs"]:
        d["command"] = tuple(d["command"])
        procs.append(ManagedProcess(**d))
    return procs


def encode_error(exc: BaseException) -> dict[str, Any]:
    """A JSON form of an error, rebuilt by :func:`decode_error` in the CLI process."""
    if isinstance(exc, TorporError):
        fields = {
            k: v for k, v in vars(exc).items() if isinstance(v, str | int | list | tuple | None)
        }
        return {"cls": type(exc).__name__, "fields": fields}
    return {"cls": "TorporError", "fields": {"msg": f"keeper failed: {exc!r}", "hint": None}}


def decode_error(data: dict[str, Any]) -> TorporError:
    """Rebuild an error encoded by :func:`encode_error`."""
    cls = getattr(_errors, data["cls"], TorporError)
    if not (isinstance(cls, type) and issubclass(cls, TorporError)):
        cls = TorporError
    exc = cls.__new__(cls)
    Exception.__init__(exc, data["fields"].get("msg", ""))
    for k, v in data["fields"].items():
        setattr(exc, k, tuple(v) if k in ("log_lines", "offenders") else v)
    return exc
