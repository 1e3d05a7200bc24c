"""The pools package's facade: what ``torpor._pools`` exports, and that it stays importable
without the optional client libraries."""

from __future__ import annotations

import subprocess
import sys

import torpor._pools as pools


def test_exports() -> None:
    assert set(pools.__all__) == {
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
    }
    for name in pools.__all__:
        assert getattr(pools, name).__doc__, name


def test_drivers_are_imported_lazily() -> None:
    code = (
        "import sys, torpor._pools, torpor._cli._pool, torpor._cli._image; "
        "print(sorted(m for m in ('rados', 'boto3', 'torpor._pools._s3', 'torpor._pools._rados') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
