"""A keep-alive HTTP load client for the servers the integration tests start.

:class:`KeepAliveLoad` sends ``GET /`` over ONE persistent connection at a steady rate from a
thread, and records every request: its latency, whether it failed, the connection's local port
(the same connection throughout, or not) and the answer's count. Nothing is retried: a failed
request is counted and the load stops, so that a test sees exactly what a client saw.
"""

from __future__ import annotations

import http.client
import statistics
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """What the client saw."""

    latencies: list[float] = field(default_factory=list)  # seconds, one per answered request
    counts: list[int] = field(default_factory=list)  # the answers' counts, in order
    ports: set[int] = field(default_factory=set)  # local ports used: {one} = one connection
    failures: list[str] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile of the latencies, in milliseconds."""
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
        return ordered[index] * 1000

    def summary(self) -> str:
        """One line: requests, failures, p50 / p99 / max latency."""
        return (
            f"{len(self.latencies)} requests, {len(self.failures)} failed, "
            f"p50 {self.percentile(50):.1f} ms, p99 {self.percentile(99):.1f} ms, "
            f"max {max(self.latencies) * 1000:.1f} ms, "
            f"mean {statistics.fmean(self.latencies) * 1000:.1f} ms"
        )


class KeepAliveLoad:
    """``rate`` requests a second to ``127.0.0.1:port`` over one keep-alive connection."""

    def __init__(self, port: int, rate: float = 50.0, timeout: float = 10.0) -> None:
        self.port = port
        self.period = 1.0 / rate
        self.timeout = timeout
        self.report = LoadReport()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> KeepAliveLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadReport:
        """Stop the load; what it saw."""
        self._stop.set()
        self._thread.join(self.timeout + 5)
        return self.report

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    conn.request("GET", "/")
                    resp = conn.getresponse()
                    body = resp.read()
                    if resp.status != 200:
                        raise OSError(f"HTTP {resp.status}")
                except (OSError, http.client.HTTPException) as exc:
                    self.report.failures.append(f"{time.monotonic():.3f}: {exc!r}")
                    return
                self.report.latencies.append(time.monotonic() - started)
                self.report.counts.append(int(body.split()[0]))
                if conn.sock is not None:
                    self.report.ports.add(conn.sock.getsockname()[1])
                next_at += self.period
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            conn.close()
