"""A WSGI app for gunicorn that answers with the host pid of its gunicorn master: which copy
of a restored server served the request (the workers' parent is the copy's root process)."""

from __future__ import annotations

from collections.abc import Callable, Iterable


def _master_host_pid() -> int:
    # /proc is the host's procfs (torpor run gives apps a PID namespace, not a mount
    # namespace), so PPid here is the master's host pid, the pid torpor reports.
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise RuntimeError("no PPid in /proc/self/status")


def app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
    """Answer every request with ``<master host pid>\\n``."""
    body = b"%d\n" % _master_host_pid()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
