"""The checkpoints of a supervised process in a pool: a series of images, and its spec.

The checkpoints of process ``N`` in pool ``P`` are the pool images named ``N.s000001``,
``N.s000002``, ... (:func:`series_name`): the sequence number orders them (newest = highest),
whatever the clocks of the hosts that made them said. A member is recognised by its name
alone and exactly (``N.s000007`` belongs to ``N``, ``N.s000001.s000002`` to ``N.s000001``),
so two processes never share a series. The spec a series was made under is in the manifest
of each member (field ``supervision``, signed with it): another host resumes ``N@P`` with the
newest member's (:func:`read_spec`), checked as a restore checks that image, then by
``Spec.from_json``. The pool object ``supervision/N`` (:func:`publish_spec`) is a copy for
people and tools to read; it is not signed, and torpor does not trust it.
"""

from __future__ import annotations

import contextlib
import enum
import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import AlreadyExistsError, ImageNotFoundError, PoolError, TorporError, UsageError
from .._images._image import Image
from .._images._manifest import now_iso
from .._images._store import check_name
from .._pools._pool import Pool, PoolImage
from .._pools._record import IMAGES_PREFIX

if TYPE_CHECKING:
    from ._spec import Spec

SPEC_PREFIX = "supervision/"

# Six digits or more (f"{seq:06d}" grows past 999999); the canonical form only, so one
# sequence number has exactly one name.
_SERIES_RE = re.compile(r"(?P<name>.+)\.s(?P<seq>[0-9]{6,})")


def series_name(name: str, seq: int) -> str:
    """The image name of checkpoint ``seq`` (1, 2, ...) of process ``name``."""
    if seq < 1:
        raise UsageError(f"a series sequence number starts at 1, not {seq}")
    return check_name(f"{name}.s{seq:06d}")


def parse_series_name(image: str) -> tuple[str, int] | None:
    """``(name, seq)`` of a series member's image name, None for any other name."""
    m = _SERIES_RE.fullmatch(image)
    if m is None:
        return None
    name, seq = m["name"], int(m["seq"])
    if seq < 1 or f"{name}.s{seq:06d}" != image:
        return None  # s000000, or leading zeros past six digits: not a name we make
    return name, seq


def _member_names(pool: Pool, name: str) -> list[tuple[int, str]]:
    """``(seq, image name)`` of every member of ``name``'s series, newest first, from the
    pool's keys alone (a member whose manifest is damaged is still one, and can be pruned)."""
    out: list[tuple[int, str]] = []
    for key in pool.backend.list(IMAGES_PREFIX):
        image = key[len(IMAGES_PREFIX) :]
        parsed = parse_series_name(image)
        if parsed is not None and parsed[0] == name:
            out.append((parsed[1], image))
    out.sort(reverse=True)
    return out


def members(pool: Pool, name: str) -> list[PoolImage]:
    """The checkpoints of ``name`` in ``pool``, newest (highest sequence number) first. A
    member whose manifest cannot be read is left out (a restore could not use it)."""
    out: list[PoolImage] = []
    for _, image in _member_names(pool, name):
        try:
            out.append(pool.image(image))
        except TorporError:
            continue  # damaged or deleted meanwhile
    return out


def next_seq(pool: Pool, name: str) -> int:
    """The sequence number of ``name``'s next checkpoint (1 for the first)."""
    found = _member_names(pool, name)
    return found[0][0] + 1 if found else 1


class _Floor(enum.Enum):
    FROM_RECORDS = "from-records"


# prune()'s default floor: found by probation_floor() from what the supervisor recorded.
FROM_RECORDS = _Floor.FROM_RECORDS


def prune(
    pool: Pool,
    name: str,
    keep: int,
    *,
    collect: bool = True,
    floor: str | _Floor | None = FROM_RECORDS,
) -> list[str]:
    """Delete all but the ``keep`` newest members of ``name``'s series and, while a restored
    copy is on probation, the ``floor`` it was restored from and the ``keep - 1`` before it
    (:func:`._policy.to_prune`; by default the floor is :func:`probation_floor`'s, None: no
    copy on probation), then (``collect``) the pool's garbage (:meth:`Pool.gc`: safe next to
    running transfers, which it waits for); the names deleted, oldest first. Nothing
    deleted, no collection."""
    from . import _policy

    if keep < 1:
        raise UsageError(f"a series keeps at least 1 checkpoint, not {keep}")
    if isinstance(floor, _Floor):
        floor = probation_floor(name)
    older = [m.name for m in members(pool, name)[1:]]
    names = [image for _, image in _member_names(pool, name)]
    deleted: list[str] = []
    for image in _policy.to_prune(names, keep, floor):
        try:
            pool.delete_image(image)
        except ImageNotFoundError:
            continue  # another pruner was first
        deleted.append(image)
    if deleted and collect:
        pool.gc()
    drop_local_copies(older)
    return sorted(deleted)


def probation_floor(name: str) -> str | None:
    """The checkpoint the copy of ``name`` that runs was restored from, while it is on
    probation (:func:`._policy.probation_floor`), from what the supervisor recorded: the
    active spec's ``min_uptime`` and the supervisor's last ``restore`` event (its image and
    time). The prune runs in a process of its own (and in the app's keeper, for the app's own
    checkpoints): the supervisor's in-memory history is not there to read. None when ``name``
    is not supervised, or its last restore is not a series member's (a migration's, none).
    An event log torpor cannot trust raises (nothing is deleted then)."""
    from . import _events, _policy, _spec

    spec = _spec.load(name)
    if spec is None:
        return None  # nobody falls back
    for event in reversed(_events.read(name)):
        if event.kind != "restore":
            continue
        image = event.fields.get("image")
        if not isinstance(image, str) or (parse_series_name(image) or ("",))[0] != name:
            return None
        try:
            since = datetime.fromisoformat(event.time).timestamp()
        except ValueError:
            return None  # (read() checked the form: not reached)
        history = _policy.History(last_image=image, running_since=since)
        return _policy.probation_floor(spec, history, _wall_clock())
    return None


def _wall_clock() -> float:
    """Now, on the clock events are written with (the tests move it)."""
    return time.time()


def local_copy(image: str) -> Path | None:
    """The local copy of series member ``image`` (kept by ``_process._topool`` for a fast
    restore), if there is one."""
    from .._images import _store

    try:
        path = _store.default_path(image)
    except (TorporError, OSError):
        return None
    return path if path.is_dir() and not path.is_symlink() else None


def drop_local_copies(names: list[str]) -> None:
    """Remove the local copies of the series members ``names``: one image per supervised
    process is kept for a fast restore (the newest), not every checkpoint."""
    from .._images._remove import remove

    for image in names:
        path = local_copy(image)
        if path is not None:
            with contextlib.suppress(TorporError, OSError):
                remove(path)


def spec_key(name: str) -> str:
    """The pool object holding the spec of ``name``'s series."""
    return SPEC_PREFIX + check_name(name, what="process name")


def publish_spec(pool: Pool, spec: Spec) -> None:
    """Store ``spec`` in ``pool`` as ``supervision/NAME`` (replacing the one there)."""
    data = json.dumps(spec.to_json(), sort_keys=True).encode()
    pool.backend.put(spec_key(spec.name), data)


def read_spec(pool: Pool, name: str) -> Spec | None:
    """The spec ``name``'s series was made under, for ``torpor resume NAME@POOL``: the
    ``supervision`` field of the manifest of its newest member that carries one. That
    manifest is checked as a restore checks it: its signed manifest must cover it
    (``Record.decode``) and the pool's signature policy must accept it (``Policy.check``), so
    the spec is exactly as trusted as the image the resume restores, and anyone who can only
    write to the pool cannot change it. The object ``supervision/NAME`` (:func:`publish_spec`)
    is not read: it is not signed. None when no member carries a spec (or there is none). A
    member the policy refuses, or whose manifest is damaged or not the signed one, is refused
    with a one-line error naming the pool and the image; so is its spec, checked by
    ``Spec.from_json``, when it is not valid or the spec of another name."""
    from ._spec import Spec

    for _, image in _member_names(pool, name):
        try:
            rec = pool._record(image)
        except ImageNotFoundError:
            continue  # deleted since the listing
        pool.policy.check(rec.name, pool.name, rec.origin)
        data = rec.manifest.supervision
        if data is None:
            continue  # its spec could not be read when it was made: the one before says
        source = f"image {image!r} in pool {pool.name!r}"
        spec = Spec.from_json(dict(data), source=source)
        if spec.name != name:
            raise PoolError(
                f"{source} carries the supervision spec of {spec.name!r}, not of {name!r}; refused",
                pool=pool.name,
                hint=f"it is not a checkpoint of {name}: delete it "
                f"(torpor image delete {image}@{pool.name})",
            )
        return spec
    return None


# -- app-driven checkpoints -------------------------------------------------------------------

# Two writers may take the same next number at once (the supervisor's periodic checkpoint and
# an app's own): the later push finds the name taken and takes the next one.
_NAME_TRIES = 5


def join_series(name: str, image: Image, *, started: float | None = None) -> str | None:
    """Make ``image``, a checkpoint the supervised app ``name`` took of itself
    (``torpor.checkpoint(..., leave_running=True)``), the next member of its series: push it
    into the spec's pool, record it (an event ``checkpoint`` with ``by="app"``, the state's
    last checkpoint and count kept), prune to the spec's ``keep``. The image pushed is
    checked against ``image.manifest`` (what the keeper sealed; the directory is the app's,
    see ``_pools._sign.local_origin``). The member's name, or None if ``name`` is not
    supervised (``NAME.sNNNNNN@POOL``), or None if ``name`` is not supervised. A failure to push
    is recorded as ``checkpoint-failed`` and raised; a failure after the push (the prune) is
    not the checkpoint's: it is recorded as made, the failure as ``step-failed``."""
    from .._images._stats import read_dump_stats_at
    from .._pools import open_pool
    from . import _events, _spec, _state

    spec = _spec.load(name)
    if spec is None:
        return None
    begun = time.monotonic() if started is None else started
    stats = read_dump_stats_at(image.path)
    frozen = stats.frozen_ms if stats is not None else None
    stored: PoolImage | None = None
    kept: int | None = None
    later: TorporError | None = None  # a step after the push failed: the checkpoint is made
    try:
        with open_pool(spec.pool) as pool:
            stored = _push_next(pool, name, image)
            prune(pool, name, spec.keep)
            kept = len(_member_names(pool, name))
    except TorporError as exc:
        if stored is None:
            with contextlib.suppress(TorporError, OSError):
                _events.append(name, "checkpoint-failed", by="app", error=str(exc))
            raise
        later = exc
    duration = time.monotonic() - begun
    done = _state.LastCheckpoint(
        image=stored.name,
        time=now_iso(),
        duration_s=duration,
        frozen_ms=frozen,
        new_bytes=stored.stored_bytes,
    )
    _events.append(
        name,
        "checkpoint",
        by="app",
        image=stored.name,
        pool=spec.pool,
        duration_s=round(duration, 6),
        frozen_ms=frozen,
        bytes=image.manifest.total_bytes,
        new_bytes=stored.stored_bytes,
    )
    _state.update(
        name, lambda s: s.evolve(last_checkpoint=done, kept=s.kept if kept is None else kept)
    )
    if later is not None:
        with contextlib.suppress(TorporError, OSError):
            _events.append(
                name, "step-failed", by="app", step="prune", image=stored.name, error=str(later)
            )
    return f"{stored.name}@{spec.pool}"


def _push_next(pool: Pool, name: str, image: Image) -> PoolImage:
    for _ in range(_NAME_TRIES):
        try:
            return pool.push(image, series_name(name, next_seq(pool, name)))
        except AlreadyExistsError:
            continue  # another writer took that number meanwhile
    raise PoolError(
        f"pool {pool.name!r}: no free series name for {name!r} after {_NAME_TRIES} tries",
        pool=pool.name,
        hint="another writer keeps adding checkpoints of it; try again",
    )


def join_series_quietly(name: str, image: Image) -> None:
    """:func:`join_series` for a caller that cannot report an error (the keeper, once the
    app has its answer): what failed is in the events of ``name``."""
    with contextlib.suppress(TorporError, OSError):
        join_series(name, image)
