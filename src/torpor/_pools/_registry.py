"""Pool drivers: their configuration keys, and how to build their backend (lazily).

Drivers are found through :data:`DRIVERS`, a registry of lazy import paths (fsspec style): a
driver's module, and the client library behind it (librados, boto3), are imported only when a
pool of that driver is opened, and a missing library becomes a :class:`~torpor.PoolError`
with the command that installs it.

Configuration keys follow LXD's storage API where they apply (``source`` for ``dir``,
``ceph.*`` for ``ceph``, ``s3.*`` for ``s3``). Every driver also takes ``compression.level``
and the ``security.*`` signature policy (:mod:`._sign`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._errors import PoolError
from ._backend import Backend

Check = Callable[[str], str | None]
"""A value check: ``None`` if the value is fine, else what is wrong with it."""


def _absolute_path(value: str) -> str | None:
    return None if value.startswith("/") and "\0" not in value else "must be an absolute path"


def _int_range(lo: int, hi: int) -> Check:
    def check(value: str) -> str | None:
        try:
            n = int(value, 10)
        except ValueError:
            return f"must be an integer from {lo} to {hi}"
        return None if lo <= n <= hi else f"must be an integer from {lo} to {hi}"

    return check


def _pattern(regex: str, what: str) -> Check:
    compiled = re.compile(regex)

    def check(value: str) -> str | None:
        return None if compiled.fullmatch(value) else f"must be {what}"

    return check


def _http_url(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parses the port, raising ValueError for a bad one
    except ValueError:
        return "must be an http:// or https:// URL"
    if parts.scheme in ("http", "https") and parts.netloc:
        return None
    return "must be an http:// or https:// URL"


def _bucket(value: str) -> str | None:
    ok = re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value) and ".." not in value
    return None if ok else "must be an S3 bucket name (3-63 lowercase letters, digits, '.', '-')"


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _bool(value: str) -> str | None:
    return None if value in ("true", "false") else "must be true or false"


def _key_ids(value: str) -> str | None:
    from .._identity import is_key_id

    bad = [k for k in (p.strip() for p in value.split(",")) if k and not is_key_id(k)]
    if bad:
        return f"must be comma-separated key ids (64 lowercase hex digits); {bad[0]!r} is not one"
    return None


@dataclass(frozen=True)
class KeySpec:
    """One configuration key of a driver.

    ``default`` is a fixed value, a function of the pool name and the rest of the
    configuration, or ``None`` (no default: unset means "let the client library decide").
    ``fixed`` keys can only be given at ``pool create`` (they say where the data is).
    """

    doc: str
    check: Check
    default: str | Callable[[str, Mapping[str, str]], str] | None = None
    required: bool = False
    secret: bool = False
    fixed: bool = False


@dataclass(frozen=True)
class Driver:
    """A pool driver: where its backend class lives and what configures it."""

    name: str
    target: str
    install_hint: str
    keys: Mapping[str, KeySpec]
    build: Callable[[Any, str, Mapping[str, str]], Backend]
    location: Callable[[str, Mapping[str, str]], str]
    doc: str = ""
    # Keys users may know from elsewhere (LXD) that this driver does not take: key → why.
    not_here: Mapping[str, str] = field(default_factory=dict)

    def load(self) -> Any:
        """Import the backend class; a missing client library raises :class:`PoolError`."""
        module_name, _, attr = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise PoolError(
                f"the {self.name!r} pool driver is not available ({exc})",
                hint=self.install_hint,
            ) from exc


def effective(driver: Driver, pool: str, config: Mapping[str, str]) -> dict[str, str]:
    """``config`` with every default filled in (keys without a default stay unset)."""
    out = dict(config)
    for key, spec in driver.keys.items():
        if key in out or spec.default is None:
            continue
        out[key] = spec.default if isinstance(spec.default, str) else spec.default(pool, out)
    return out


def default_dir_source(pool: str) -> Path:
    """Where a ``dir`` pool without ``source`` keeps its data."""
    from .. import _paths

    return _paths.pools_dir() / pool


_COMMON: dict[str, KeySpec] = {
    "compression.level": KeySpec(
        "zstd level for new chunks (1 fast … 19 small)", _int_range(1, 19), default="3"
    ),
    "security.require_signed": KeySpec(
        "refuse images not signed by a trusted key (true or false)", _bool, default="false"
    ),
    "security.trusted_keys": KeySpec(
        "comma-separated key ids trusted besides this host's own (`torpor identity show`)",
        _key_ids,
    ),
    # Read by ``torpor restore`` (``_lazy._policy``); unset: never lazy unless --lazy.
    "restore.lazy_above": KeySpec(
        "restore NAME@POOL lazily by default when its memory is at least this size "
        "(0, 512MiB, 1G; --lazy/--no-lazy decide)",
        _pattern(r"[0-9]{1,15}\s*(?:[KMGTkmgt](?:i?[Bb])?|[Bb])?", "a size: 0, 512MiB, 1G"),
    ),
}


def _build_dir(cls: Any, pool: str, cfg: Mapping[str, str]) -> Backend:
    backend: Backend = cls(Path(cfg["source"]))
    return backend


def _build_ceph(cls: Any, pool: str, cfg: Mapping[str, str]) -> Backend:
    backend: Backend = cls(
        cfg["ceph.conf"],
        cluster_name=cfg["ceph.cluster_name"],
        user=cfg["ceph.user.name"],
        pool_name=cfg["ceph.osd.pool_name"],
        pg_num=int(cfg["ceph.osd.pg_num"]),
    )
    return backend


def _build_s3(cls: Any, pool: str, cfg: Mapping[str, str]) -> Backend:
    backend: Backend = cls(
        bucket=cfg["s3.bucket"],
        endpoint_url=cfg.get("s3.endpoint"),
        region=cfg.get("s3.region"),
        access_key=cfg.get("s3.access_key"),
        secret_key=cfg.get("s3.secret_key"),
    )
    return backend


DRIVERS: dict[str, Driver] = {
    "dir": Driver(
        name="dir",
        target="torpor._pools._dir:DirBackend",
        install_hint="the dir driver ships with torpor; reinstall torpor",
        doc="a local directory (one file per pack)",
        keys={
            "source": KeySpec(
                "directory holding the pool's data (default: <torpor home>/pools/<pool>)",
                _absolute_path,
                default=lambda pool, _cfg: str(default_dir_source(pool)),
                fixed=True,
            ),
            **_COMMON,
        },
        build=_build_dir,
        location=lambda _pool, cfg: cfg["source"],
    ),
    "ceph": Driver(
        name="ceph",
        target="torpor._pools._rados:RadosBackend",
        install_hint=(
            "install Ceph's Python binding (apt-get install python3-rados) and link it into "
            "torpor's venv: scripts/setup.sh does both"
        ),
        doc="a RADOS pool of a Ceph cluster (librados)",
        keys={
            "ceph.cluster_name": KeySpec(
                "name of the Ceph cluster",
                _pattern(r"[A-Za-z0-9_-]{1,64}", "letters, digits, '_' or '-'"),
                default="ceph",
                fixed=True,
            ),
            "ceph.user.name": KeySpec(
                "Ceph user (client.<name>) to connect as",
                _pattern(r"[A-Za-z0-9_.-]{1,64}", "letters, digits, '.', '_' or '-'"),
                default="admin",
            ),
            "ceph.osd.pool_name": KeySpec(
                "RADOS pool holding the data (default: the pool's name)",
                _pattern(r"[A-Za-z0-9_.-]{1,128}", "letters, digits, '.', '_' or '-'"),
                default=lambda pool, _cfg: pool,
                fixed=True,
            ),
            "ceph.osd.pg_num": KeySpec(
                "placement groups when torpor creates the RADOS pool",
                _int_range(1, 65536),
                default="32",
                fixed=True,
            ),
            "ceph.conf": KeySpec(
                "path of the cluster's ceph.conf, which also names the keyring "
                "(default: /etc/ceph/<cluster>.conf)",
                _absolute_path,
                default=lambda _pool, cfg: f"/etc/ceph/{cfg['ceph.cluster_name']}.conf",
            ),
            **_COMMON,
        },
        build=_build_ceph,
        not_here={
            "ceph.keyring": "name the keyring in ceph.conf ('keyring = PATH'), "
            "and point ceph.conf at that file",
        },
        location=lambda _pool, cfg: (
            f"rados://{cfg['ceph.cluster_name']}/{cfg['ceph.osd.pool_name']}"
        ),
    ),
    "s3": Driver(
        name="s3",
        target="torpor._pools._s3:S3Backend",
        install_hint="pip install 'torpor[s3]'",
        doc="an S3 bucket (boto3); credentials also from boto3's usual places",
        keys={
            "s3.bucket": KeySpec("bucket holding the data", _bucket, required=True, fixed=True),
            "s3.endpoint": KeySpec(
                "endpoint URL (default: AWS); e.g. http://127.0.0.1:7480 for Ceph RGW", _http_url
            ),
            "s3.region": KeySpec(
                "region name", _pattern(r"[a-z0-9-]{1,32}", "lowercase letters, digits or '-'")
            ),
            "s3.access_key": KeySpec(
                "access key id (default: boto3's credential chain)", _non_empty
            ),
            "s3.secret_key": KeySpec(
                "secret access key (default: boto3's credential chain)", _non_empty, secret=True
            ),
            **_COMMON,
        },
        build=_build_s3,
        location=lambda _pool, cfg: (
            f"s3://{cfg['s3.bucket']}"
            + (f" at {cfg['s3.endpoint']}" if cfg.get("s3.endpoint") else "")
        ),
    ),
}


def get_driver(name: str) -> Driver:
    """The driver called ``name``; :class:`PoolError` naming the known ones if unknown."""
    try:
        return DRIVERS[name]
    except KeyError as exc:
        raise PoolError(
            f"unknown pool driver {name!r}", hint=f"use one of: {', '.join(sorted(DRIVERS))}"
        ) from exc


def open_backend(driver: Driver, pool: str, config: Mapping[str, str]) -> Backend:
    """Build the backend of a pool from its effective configuration."""
    return driver.build(driver.load(), pool, effective(driver, pool, config))
