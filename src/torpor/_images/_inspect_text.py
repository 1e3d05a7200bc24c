"""``torpor inspect``'s report for people: manifest, process tree, memory, files, sockets."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._inspection import Inspection, Task


def render_text(inspection: Inspection) -> str:
    """A readable report: manifest, process tree, memory per task, files, sockets."""
    out: list[str] = [f"Image {inspection.path}"]
    m = inspection.manifest
    if m is not None:
        out += [
            f"  name {m.name!r}, id {m.id}, created {m.created}",
            f"  host {m.host}, kernel {m.kernel}, CRIU {m.criu_version}, pid {m.pid}",
            f"  command {' '.join(m.cmdline) or '?'}",
            f"  {len(m.files)} files, {_human(m.total_bytes)}"
            + "".join(
                f", {flag}"
                for flag, on in (
                    ("tcp-established", m.tcp_established),
                    ("shell-job", m.shell_job),
                    ("coordinated", m.coordinated),
                )
                if on
            ),
        ]
        out += [f"  label {k}={v}" for k, v in sorted(m.labels.items())]
    else:
        out.append("  (no torpor manifest: a bare CRIU image)")

    out += ["", "Processes"]
    depth = _depths(inspection.tasks)
    out += _table(
        ("PID", "PPID", "PGID", "SID", "THREADS", "STATE", "COMMAND"),
        [
            (
                t.pid,
                t.ppid,
                t.pgid,
                t.sid,
                len(t.threads),
                t.state,
                "  " * depth[t.pid] + t.comm + (f" ({t.exe})" if t.exe else ""),
            )
            for t in inspection.tasks
        ],
    )

    total = inspection.memory
    out += [
        "",
        f"Memory: {total.pages_dumped} pages dumped ({_human(total.bytes_dumped)}) "
        f"in {total.vmas} areas mapping {_human(total.mapped_bytes)}; "
        f"pages-*.img hold {_human(inspection.pages_file_bytes)}",
    ]
    if total.pages_lazy or total.pages_in_parent:
        out.append(
            f"  {total.pages_lazy} pages lazy (page server), "
            f"{total.pages_in_parent} pages in the parent image"
        )
    for t in inspection.tasks:
        mem = t.memory
        out += [
            "",
            f"  {t.pid} {t.comm}: {mem.vmas} areas, {_human(mem.mapped_bytes)} mapped, "
            f"{mem.pages_dumped} pages ({_human(mem.bytes_dumped)}) dumped",
        ]
        out += [
            "  " + line
            for line in _table(
                ("START", "END", "SIZE", "PERMS", "KIND", "PAGES", "PATH"),
                [
                    (
                        f"{v.start:x}",
                        f"{v.end:x}",
                        _human(v.size),
                        v.perms,
                        v.kind,
                        v.pages_dumped or "",
                        v.path or "",
                    )
                    for v in t.vmas
                ],
            )
        ]

    out += ["", "Open files"]
    out += _table(
        ("PID", "FD", "TYPE", "WHAT"),
        [(t.pid, f.fd, f.type, f.summary) for t in inspection.tasks for f in t.files],
    )

    out += ["", "Sockets"]
    if inspection.sockets:
        out += _table(
            ("FAMILY", "TYPE", "PROTO", "STATE", "LOCAL", "REMOTE", "QUEUES", "HELD BY"),
            [
                (
                    s.family,
                    s.type,
                    s.protocol,
                    s.state,
                    s.local,
                    s.remote,
                    f"in {s.tcp_stream.inq_len}, out {s.tcp_stream.outq_len}"
                    if s.tcp_stream
                    else "",
                    " ".join(f"{pid}:{fd}" for pid, fd in inspection.holders(s.file_id)),
                )
                for s in inspection.sockets
            ],
        )
    else:
        out.append("  none")
    return "\n".join(out)


def _depths(tasks: Iterable[Task]) -> dict[int, int]:
    depth: dict[int, int] = {}
    # pstree.img lists parents before their children.
    for t in tasks:
        depth[t.pid] = depth[t.ppid] + 1 if t.ppid in depth else 0
    return depth


def _table(headers: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    cells = [list(headers)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def _human(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"
