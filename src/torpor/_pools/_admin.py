"""Pool administration: create, reconfigure and delete pools (what ``torpor pool`` does)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping

from .._errors import PoolError
from . import _config
from ._config import DEFAULT_POOL, PoolConfig
from ._pool import Pool, open_pool
from ._registry import default_dir_source, open_backend


def create_pool(name: str, driver: str, config: Mapping[str, str]) -> PoolConfig:
    """Validate, reach the backend (creating its bucket/RADOS pool/directory as the driver
    does), mark it as a torpor pool, then save the configuration.

    Existing torpor data at the location is adopted (two hosts can share one pool).
    """
    cfg = _config.new_config(name, driver, config)
    backend = open_backend(cfg.spec, cfg.name, cfg.config)
    try:
        Pool(cfg.name, backend).close()
    except BaseException:
        backend.close()
        raise
    _config.save(cfg, new=True)
    return cfg


def set_pool(name: str, changes: Mapping[str, str]) -> PoolConfig:
    """Apply ``key=value`` changes (empty value: unset) to pool ``name``; save and return."""
    cfg = _config.updated(_config.load(name), changes)
    _config.save(cfg, new=False)
    return cfg


def delete_pool(name: str, *, force: bool = False) -> int:
    """Delete pool ``name`` and the objects torpor keeps in it; return how many went.

    Refused while it holds images, unless ``force`` (then its records are not even read: one
    that is damaged or hostile must not keep a pool from being deleted). The ``default`` pool
    cannot be deleted.
    """
    if name == DEFAULT_POOL:
        raise PoolError(
            "the default pool cannot be deleted",
            pool=name,
            hint="`torpor image delete NAME@default` removes its images",
        )
    cfg = _config.load(name)
    with open_pool(name) as pool:
        images = [] if force else pool.list_images()
        if images:
            raise PoolError(
                f"pool {name!r} holds {len(images)} image(s)",
                pool=name,
                hint="delete or copy them first, or use --force to delete them with the pool",
            )
        removed = pool.destroy()
    _config.remove(name)
    if cfg.driver == "dir" and "source" not in cfg.config:
        # Only the directory torpor chose itself; a user's `source` stays where it was.
        shutil.rmtree(default_dir_source(name), ignore_errors=True)
    return removed
