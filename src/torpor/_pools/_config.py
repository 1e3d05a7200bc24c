"""Pool configurations: validated per driver, persisted one JSON file per pool (mode 0600).

A configuration lives in ``<torpor home>/pools/<name>.json``. Pool names have no dots, so a
config file never collides with a ``dir`` pool's default data directory
``<torpor home>/pools/<name>/``. The ``default`` pool (driver ``dir``, data in
``<torpor home>/pools/default``) exists without a file; ``pool set default ...`` writes one.

Only the keys the user gave are stored; defaults are filled in when the pool is opened, so a
better default in a later torpor applies to old pools too. Secret values (``s3.secret_key``)
never appear in messages and are masked when shown.

A configuration says where root reads and writes a pool's data, so it is trusted only as a
file torpor could have written: opened ``O_NOFOLLOW`` (a symlink is refused), a regular file
owned by the effective user or root and not writable by group or others (checked with
``fstat`` on the open file); written 0600 through ``O_EXCL|O_NOFOLLOW`` temporary files.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import _paths, _safe
from .._errors import (
    AlreadyExistsError,
    NotFoundError,
    PoolConfigError,
    PoolError,
    UnsafePathError,
    UsageError,
)
from .._images._manifest import now_iso
from ._registry import Driver, effective, get_driver

DEFAULT_POOL = "default"
MASK = "********"
_MAX_CONFIG = 1 << 20
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def check_pool_name(name: str) -> str:
    """Return ``name`` if it is a valid pool name, else raise :class:`UsageError`."""
    if not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid pool name {name!r}",
            hint="use 1-63 letters, digits, '_' or '-', starting with a letter or digit",
        )
    return name


@dataclass(frozen=True)
class PoolConfig:
    """A pool's name, driver and the configuration keys the user set."""

    name: str
    driver: str
    config: Mapping[str, str] = field(default_factory=dict)
    created: str = ""

    @property
    def spec(self) -> Driver:
        """The pool's driver."""
        return get_driver(self.driver)

    def effective(self) -> dict[str, str]:
        """The configuration with every default filled in."""
        return effective(self.spec, self.name, self.config)

    def shown(self) -> dict[str, str]:
        """The effective configuration with secret values masked."""
        keys = self.spec.keys
        return {
            k: (MASK if k in keys and keys[k].secret else v)
            for k, v in sorted(self.effective().items())
        }

    @property
    def location(self) -> str:
        """Where the pool's data is, for people (no secrets)."""
        return self.spec.location(self.name, self.effective())

    def to_json(self) -> str:
        """The on-disk form."""
        data = {
            "name": self.name,
            "driver": self.driver,
            "config": dict(sorted(self.config.items())),
            "created": self.created,
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str) -> PoolConfig:
        """Parse the on-disk form; :class:`PoolError` if it is malformed."""
        try:
            data = json.loads(text)
            fields = (data["name"], data["driver"], data["created"])
            config = data["config"]
            # Written by torpor, every one is a string: anything else was planted or damaged.
            if not all(isinstance(v, str) for v in (*fields, *config, *config.values())):
                raise TypeError("a name, driver, time or configuration value is not a string")
            return cls(*fields[:2], dict(config), fields[2])
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise PoolError(
                f"pool configuration {source} is malformed ({exc})",
                hint="fix or delete the file",
            ) from exc


def parse_assignments(items: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b=2"]`` → ``{"a": "1", "b": "2"}``; :class:`UsageError` on a bad item."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {item!r}", hint="e.g. source=/srv/torpor")
        out[key.strip()] = value
    return out


def validate(pool: str, driver: Driver, config: Mapping[str, str]) -> dict[str, str]:
    """Check ``config`` for ``driver`` (every key known, every value good); return it."""
    for key, value in config.items():
        spec = driver.keys.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, list(driver.keys), n=1)
            if key in driver.not_here:
                hint = driver.not_here[key]
            elif close:
                hint = f"did you mean {close[0]!r}?"
            else:
                hint = f"the {driver.name} driver knows: {', '.join(sorted(driver.keys))}"
            raise PoolConfigError(
                f"pool {pool!r}: unknown key {key!r} for the {driver.name} driver",
                pool=pool,
                key=key,
                hint=hint,
            )
        problem = spec.check(value)
        if problem:
            shown = "(secret value)" if spec.secret else repr(value)
            raise PoolConfigError(
                f"pool {pool!r}: bad value {shown} for {key}: it {problem}",
                pool=pool,
                key=key,
                hint=f"{key} is the {spec.doc}",
            )
    for key, spec in driver.keys.items():
        if spec.required and key not in config:
            raise PoolConfigError(
                f"pool {pool!r}: the {driver.name} driver needs {key}",
                pool=pool,
                key=key,
                hint=f"add {key}=... ({spec.doc})",
            )
    return dict(config)


def _config_path(name: str) -> Path:
    return _paths.pools_dir() / f"{check_pool_name(name)}.json"


def load(name: str) -> PoolConfig:
    """The configuration of pool ``name``; :class:`NotFoundError` if there is none,
    :class:`~torpor.UnsafePathError` if it is not a file torpor could have written."""
    path = _config_path(name)
    try:
        raw = _read_config(path)
    except FileNotFoundError as exc:
        if name == DEFAULT_POOL:
            return PoolConfig(DEFAULT_POOL, "dir")
        raise NotFoundError(
            f"no pool named {name!r}",
            hint="`torpor pool list` shows the pools; `torpor pool create` makes one",
        ) from exc
    except OSError as exc:
        raise PoolError(f"cannot read pool configuration {path}: {exc}", pool=name) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PoolError(
            f"pool configuration {path} is not UTF-8", pool=name, hint="fix or delete the file"
        ) from exc
    cfg = PoolConfig.from_json(text, source=str(path))
    if cfg.name != name:
        raise PoolError(
            f"pool configuration {path} names pool {cfg.name!r}", hint="fix or delete the file"
        )
    # A file in the home is outside input like any other: its values pass the checks that
    # `pool create` and `pool set` apply (a relative dir pool source, a bad level ...).
    validate(name, cfg.spec, cfg.config)
    return cfg


def _read_config(path: Path) -> bytes:
    """The bytes of a configuration file, refused unless torpor could have written it."""
    with _safe.opened_dir(path.parent) as dir_fd:
        try:
            fd = os.open(
                path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _unsafe(path, "is a symlink", f"remove {path}") from exc
            raise
    try:
        st = os.fstat(fd)
        kind = _safe.kind_problem(st.st_mode)
        if kind is not None:
            raise _unsafe(path, f"is {kind}, not a regular file", f"remove {path}")
        owner = _safe.owner_problem(st)
        if owner is not None:
            raise _unsafe(path, owner, f"chown {os.geteuid()} {path}")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise _unsafe(
                path,
                f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                f"chmod go-w {path}",
            )
        os.set_blocking(fd, True)
        data = os.read(fd, _MAX_CONFIG + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_CONFIG:
        raise PoolError(f"pool configuration {path} is larger than {_MAX_CONFIG} bytes")
    return data


def _unsafe(path: Path, problem: str, fix: str) -> UnsafePathError:
    return UnsafePathError(f"pool configuration {path} {problem}; refused", path=path, hint=fix)


def list_configs() -> list[PoolConfig]:
    """Every configured pool, ``default`` included, by name."""
    names = {DEFAULT_POOL}
    for entry in os.scandir(_paths.pools_dir()):
        stem, dot, ext = entry.name.rpartition(".")
        if dot and ext == "json" and _NAME_RE.fullmatch(stem) and entry.is_file():
            names.add(stem)
    return [load(n) for n in sorted(names)]


def save(cfg: PoolConfig, *, new: bool) -> None:
    """Write ``cfg`` (0600) atomically; with ``new``, fail if the pool exists already."""
    path = _config_path(cfg.name)
    tmp = f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    dir_fd = _safe.open_dir(path.parent)
    try:
        fd = _safe.create_file(dir_fd, tmp, source=str(path.parent))
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(cfg.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            try:
                os.link(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError as exc:
                raise AlreadyExistsError(
                    f"pool {cfg.name!r} exists already",
                    path=str(path),
                    hint="`torpor pool show` it, or choose another name",
                ) from exc
        else:
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        raise PoolError(f"cannot write pool configuration {path}: {exc}", pool=cfg.name) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        os.close(dir_fd)


def remove(name: str) -> None:
    """Delete the configuration file of pool ``name`` (missing is fine)."""
    with contextlib.suppress(FileNotFoundError):
        _config_path(name).unlink()


def new_config(name: str, driver_name: str, config: Mapping[str, str]) -> PoolConfig:
    """A validated configuration for a new pool (not saved)."""
    check_pool_name(name)
    if name == DEFAULT_POOL or _config_path(name).exists():
        raise AlreadyExistsError(
            f"pool {name!r} exists already", hint="`torpor pool show` it, or choose another name"
        )
    driver = get_driver(driver_name)
    return PoolConfig(name, driver.name, validate(name, driver, config), now_iso())


def updated(cfg: PoolConfig, changes: Mapping[str, str]) -> PoolConfig:
    """``cfg`` with ``changes`` applied (an empty value unsets the key), validated.

    Keys that say where the data is (``source``, ``ceph.osd.pool_name``, ``s3.bucket``, ...)
    cannot change: the images would stay behind.
    """
    driver = cfg.spec
    merged = dict(cfg.config)
    for key, value in changes.items():
        spec = driver.keys.get(key)
        if spec is not None and spec.fixed and cfg.config.get(key, "") != value:
            raise PoolConfigError(
                f"pool {cfg.name!r}: {key} cannot be changed once the pool exists",
                pool=cfg.name,
                key=key,
                hint="create a new pool and `torpor image copy` the images to it",
            )
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    return PoolConfig(cfg.name, cfg.driver, validate(cfg.name, driver, merged), cfg.created)
