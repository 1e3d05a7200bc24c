"""``_migrate._poolident.identity``: a pool's format marker is read bounded (hostile pool)."""

from __future__ import annotations

from pathlib import Path

import pytest

from torpor._errors import PoolError
from torpor._migrate._poolident import identity
from torpor._pools import MemoryBackend, Pool
from torpor._pools._reader import MAX_META, META_KEY

from .test_pool_support import FAST


def test_a_marker_bigger_than_torpor_writes_is_refused(torpor_home: Path) -> None:
    pool = Pool("mem", MemoryBackend(), timing=FAST)
    assert len(identity(pool, "mem")["marker"]) == 64  # the marker torpor wrote: read
    pool.backend.put(META_KEY, b"x" * (MAX_META + 1))
    with pytest.raises(PoolError) as caught:
        identity(pool, "mem")
    assert "\n" not in str(caught.value) and str(MAX_META) in str(caught.value)
