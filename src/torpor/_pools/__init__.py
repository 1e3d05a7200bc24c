"""Storage pools for images: content-addressed, deduplicated, on ``dir``, ``ceph`` or ``s3``.

::

    from torpor._pools import open_pool
    with open_pool("default") as pool:
        pool.push(image, "web-1")
        image = pool.pull("web-1")

See ``docs/pools.md`` for the user's view, :mod:`._pool` for the layout in a backend,
:mod:`._cas`/:mod:`._pack` for chunking and packs, :mod:`._gc` for garbage collection.
"""

from ._admin import create_pool as create_pool
from ._admin import delete_pool as delete_pool
from ._admin import set_pool as set_pool
from ._backend import Backend as Backend
from ._config import DEFAULT_POOL as DEFAULT_POOL
from ._config import PoolConfig as PoolConfig
from ._config import list_configs as list_configs
from ._config import load as load_config
from ._gc import GcStats as GcStats
from ._memory import MemoryBackend as MemoryBackend
from ._pool import Pool as Pool
from ._pool import PoolImage as PoolImage
from ._pool import PoolStats as PoolStats
from ._pool import open_pool as open_pool
from ._registry import DRIVERS as DRIVERS
from ._session import Timing as Timing

__all__ = [
    "DEFAULT_POOL",
    "DRIVERS",
    "Backend",
    "GcStats",
    "MemoryBackend",
    "Pool",
    "PoolConfig",
    "PoolImage",
    "PoolStats",
    "Timing",
    "create_pool",
    "delete_pool",
    "list_configs",
    "load_config",
    "open_pool",
    "set_pool",
]
