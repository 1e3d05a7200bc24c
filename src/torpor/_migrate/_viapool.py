"""``torpor migrate NAME --to HOST:PORT --mode pool --pool P``: migration through a shared pool.

The image does not go over the channel: the source pushes it into a pool both hosts reach (a
Ceph cluster, an S3 bucket, a directory both mount), the target restores it from there. The
channel carries the pre-flight, the name of the record and the image's file hashes, and the
verdict. The order, and why the process is never lost (as in copy mode, :mod:`._copy`):

1. Pre-flight (:mod:`._preflight`) with the pool's *identity*: its driver and the SHA-256 of
   its ``torpor-pool.json`` (written once, when the pool was first opened: its format and the
   time to the microsecond). The target looks among the pools configured there for one whose
   marker is the same bytes (:func:`local_pool`); it must be able to open and read it. No such
   pool, or one it cannot reach, is a refusal: nothing was frozen.
2. Dump, the tree held frozen at CRIU's ``post-dump``. While CRIU waits, the dump is sealed as
   an image (manifest, signed with this host's key) and pushed into the pool under a record
   name of its own (``NAME.migrate-<random>``): only the chunks the pool lacks are stored, so
   the memory a previous checkpoint of the same program left there is not sent again.
3. The target is told the record and every file's SHA-256; it pulls the image (every chunk
   and file verified, as any pull) and restores only if the files are the ones the source
   sealed (a pool others can write to cannot slip in another image), under the same name.
4. Only when the target reports ``running`` does CRIU kill the original; anything else (the
   push fails, the pull or restore fails, the link is cut, no answer in time) and CRIU thaws
   it. The record is deleted from the pool either way (its chunks go at the next
   ``torpor pool gc``), and the target's pulled copy with it: it was only in transit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._engine import DUMP_LOG, criu_version
from .._errors import TorporError
from .._images import _manifest
from .._images._image import Image, seal
from .._process import _locks, _registry
from .._process._proc import facts
from .._safe import open_dir
from . import _preflight
from ._channel import ChannelError, connect
from ._copy import DEFAULT_TIMEOUT, _Move
from ._poolident import _found, identity, local_pool, pool_problems  # noqa: F401 (re-exported)
from ._send import MAX_FILES, MigrationError, addresses_to_move, preflight
from ._wire import Progress

if TYPE_CHECKING:
    from ._copy import Summary
    from ._serve import _Incoming

# -- the source ----------------------------------------------------------------------------------


def migrate_pool(
    name: str,
    host: str,
    port: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    tcp_established: bool = False,
    pool: str,
    say: Callable[[str], None] | None = None,
    addresses: Sequence[str] = (),
) -> Summary:
    """Move the managed process ``name`` to the torpor at ``host:port`` through ``pool`` (see
    the module docstring), with its service addresses and ``addresses`` (``ADDR/PREFIX``, as
    copy mode); its :class:`~._copy.Summary` (``bytes``: the image's size;
    ``transfer_ms``: from the freeze until the image was in the pool).
    :class:`~._send.MigrationRefusedError` if pre-flight failed, :class:`~._send.MigrationError`
    if anything else did: the process then runs here, unchanged."""
    from .._pools import load_config, open_pool

    started = time.monotonic()
    rec = _registry.load(name)
    _registry.check_live(rec)
    ref = rec.ref
    where = f"{host}:{port}"
    moving, conns = addresses_to_move(name, rec, addresses)
    cfg = load_config(pool)
    with open_pool(pool) as opened:  # unreachable here: nothing touched
        ident = identity(opened, cfg.driver)
    facts_msg = _preflight.facts_for(name, ref.pid, mode="pool")
    conn = connect(host, port)
    with conn:
        conn.settimeout(timeout)
        preflight(
            conn,
            {**facts_msg, "pool": ident, "addresses": [str(a) for a in moving]},
            name=name,
            where=where,
            pid=ref.pid,
        )
        if say is not None:
            say(f"pre-flight passed on {where}; dumping {name} (pid {ref.pid}) into pool {pool}")
        with _locks.dumping(ref, unless_requested=True):
            _registry.update(name, ref, migrating=f"to {where}")
            move = _PoolMove(
                conn, name, where, ref, tcp_established=tcp_established or bool(conns), say=say
            )
            move.pool, move.addresses = pool, moving
            try:
                summary = move.run(timeout)
            finally:
                move.forget()
                with contextlib.suppress(OSError, TorporError):
                    _registry.update(name, ref, migrating=None)
    with contextlib.suppress(OSError, TorporError):
        _registry.update(name, ref, migrated_to=where)
    with contextlib.suppress(OSError, TorporError, ValueError):
        from .._supervise import _events

        _events.append(name, "checkpoint", migrated_to=where, mode="pool", pool=pool)
    total = round((time.monotonic() - started) * 1000, 1)
    return dataclasses.replace(summary, mode="pool", total_ms=total, tcp_connections=len(conns))


class _PoolMove(_Move):
    """Copy mode's dump and verdict (:class:`~._copy._Move`); at ``post-dump`` the image is
    sealed and pushed into the pool instead of sent, and the target told where it is."""

    pool = ""
    record = ""

    def _transfer(self) -> None:
        image = self._seal()
        from .._pools import open_pool

        self.record = f"{self.name}.migrate-{os.urandom(4).hex()}"
        progress = Progress(self.say, image.manifest.total_bytes, f"pool {self.pool}")
        with open_pool(self.pool) as pool:
            stored = pool.push(image, self.record, progress=progress)
        self.bytes, self.files = image.manifest.total_bytes, len(image.manifest.files)
        self.sent_at = time.monotonic()
        if self.say is not None:
            self.say(
                f"pushed {self.bytes} bytes into pool {self.pool} as {self.record} "
                f"({stored.stored_bytes} new); {self.where} restores it"
            )
        self.conn.send(
            {
                "type": "restore",
                "record": self.record,
                "files": {f.name: f.sha256 for f in image.manifest.files},
            }
        )
        reply = self.conn.recv()
        if reply.get("type") == "failed":
            raise MigrationError(f"{self.where} could not take it: {reply.get('error')}")
        if reply.get("type") != "running" or not isinstance(reply.get("pid"), int):
            raise MigrationError(f"{self.where} answered {reply.get('type')!r}, not running")
        # The service addresses stay here until the commit (_Move.run takes them down after
        # CRIU's kill, under its lock): a failure from here on (the journal, the lock's name)
        # thaws the original, which must find them where it left them.
        self.running_at = time.monotonic()
        self.reply = reply

    def _seal(self) -> Image:
        """The dump in the staging directory, sealed in place as an image (signed)."""
        cmdline, rss = facts(self.pid)
        source = str(self.staging)
        dir_fd = open_dir(self.staging)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(DUMP_LOG, dir_fd=dir_fd)  # CRIU's log is no part of the image

            def manifest(entries: list[_manifest.FileEntry]) -> _manifest.Manifest:
                if len(entries) > MAX_FILES:
                    raise MigrationError(f"the dump has {len(entries)} files, over {MAX_FILES}")
                return _manifest.build(
                    name=self.name,
                    pid=self.pid,
                    files=entries,
                    criu_version=criu_version(),
                    cmdline=list(cmdline),
                    rss_bytes=rss,
                    tcp_established=self.options.tcp_established,
                    shell_job=self.options.shell_job,
                )

            seal(dir_fd, manifest, source=source)
        finally:
            os.close(dir_fd)
        return Image.open(self.staging)

    def forget(self) -> None:
        """Delete the record from the pool (done or not, it was only in transit)."""
        if not self.record:
            return
        from .._pools import open_pool

        with contextlib.suppress(OSError, TorporError), open_pool(self.pool) as pool:
            pool.delete_image(self.record)


# -- the target ----------------------------------------------------------------------------------


def serve_pool(incoming: _Incoming, name: str, first: Mapping[str, Any]) -> None:
    """The target's side, after pre-flight passed (the pool was found) and ``ready`` was
    sent: pull the record the source names, check its files are the ones the source sealed,
    restore it as ``name`` (:meth:`~._serve._Incoming._restore`: ``running``, then the
    source's ``done`` or ``abort``)."""
    from .._pools import open_pool

    conn = incoming.conn
    ident = first.get("pool")
    known = _found.pop(json.dumps(ident, sort_keys=True), None)
    local, found = (known, []) if known else local_pool(ident, where=incoming.where)
    msg = conn.recv()
    record, files = msg.get("record"), msg.get("files")
    if msg.get("type") != "restore" or not isinstance(record, str) or not isinstance(files, dict):
        raise ChannelError(f"{incoming.peer} sent {msg.get('type')!r}, not the record to restore")
    image: Image | None = None
    try:
        try:
            if local is None:
                raise TorporError("; ".join(found))
            if not record.startswith(f"{name}.migrate-") or len(files) > MAX_FILES:
                raise TorporError(f"{incoming.peer} named a record {record!r} not of {name!r}")
            with open_pool(local) as pool:
                image = pool.pull(record)
            have = {f.name: f.sha256 for f in image.manifest.files}
            if have != files:
                raise TorporError(
                    f"{record}@{local} is not the image {incoming.peer} pushed: its files differ"
                )
            incoming.log(
                f"pulled {record!r} from pool {local!r} for {incoming.peer}: "
                f"{image.manifest.total_bytes} bytes, verified"
            )
        except TorporError as exc:
            with contextlib.suppress(TorporError):
                conn.send({"type": "failed", "error": exc.msg})
            raise
        incoming._restore(image, name)
    finally:
        if image is not None:
            shutil.rmtree(image.path, ignore_errors=True)
    if incoming.outcome is not None:
        incoming.log(incoming.outcome)
