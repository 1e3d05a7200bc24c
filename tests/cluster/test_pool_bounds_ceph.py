"""The ``ceph`` driver's bounded reads against objects torpor did not write (a hostile pool).

The conformance suite checks ``get(key, limit)`` on values the driver wrote; here RADOS
objects are written under the driver, through librados: a plain object larger than a stripe
(torpor never writes one) and a stripe manifest claiming a terabyte. Each is refused before
it is read whole: the reads the driver makes are recorded and stay within the limit.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conformance.backend_suite import MIB, payload

from torpor._errors import PoolError
from torpor._pools._rados import _MAGIC, RadosBackend

pytestmark = pytest.mark.ceph

POOL = "torpor-tests"


class _Reads:
    """An I/O context recording the length of every read."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.lengths: list[int] = []

    def read(self, key: str, length: int = 8192, offset: int = 0) -> Any:
        self.lengths.append(length)
        return self._inner.read(key, length, offset)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def backend(ceph_cluster: dict[str, Any], admin_ioctx: Any) -> Iterator[tuple[RadosBackend, Any]]:
    """A backend in a fresh namespace (its reads recorded), and the raw handle set to it."""
    ns = f"b-{uuid.uuid4().hex[:12]}"
    b = RadosBackend(
        ceph_cluster["conf"], ceph_cluster["cluster"], ceph_cluster["rados_user"], POOL, 8,
        namespace=ns,
    )  # fmt: skip
    b._ioctx = _Reads(b._ioctx)
    admin_ioctx.set_namespace(ns)
    yield b, admin_ioctx
    b.close()
    admin_ioctx.set_namespace(ns)
    for obj in list(admin_ioctx.list_objects()):
        admin_ioctx.remove_object(obj.key)


def test_a_foreign_object_over_a_stripe_is_refused_unread(
    backend: tuple[RadosBackend, Any],
) -> None:
    b, raw = backend
    value = payload(10 * MIB, seed=9)  # over the 4 MiB stripe: never a head torpor writes
    raw.write_full("packs/ab/foreign", value)
    with pytest.raises(PoolError) as info:
        b.get("packs/ab/foreign", limit=MIB)
    message = str(info.value)
    assert "\n" not in message
    assert f"'packs/ab/foreign' in ceph pool {POOL} is {10 * MIB} bytes" in message
    assert f"over the {MIB} bytes" in message and "`torpor pool gc POOL`" in message
    assert sum(b._ioctx.lengths) <= MIB + 1  # type: ignore[attr-defined]
    assert b.get("packs/ab/foreign") == value  # unbounded, it is still the whole object


def test_a_foreign_object_within_the_limit_is_read(backend: tuple[RadosBackend, Any]) -> None:
    b, raw = backend
    value = payload(6 * MIB, seed=10)
    raw.write_full("big", value)
    assert b.get("big", limit=6 * MIB) == value
    with pytest.raises(PoolError, match=f"is {6 * MIB} bytes, over the {6 * MIB - 1} bytes"):
        b.get("big", limit=6 * MIB - 1)


def test_a_manifest_claiming_a_terabyte_is_refused_before_its_parts(
    backend: tuple[RadosBackend, Any],
) -> None:
    b, raw = backend
    size, part = 1 << 40, 4 << 20
    fields = {"size": size, "part_size": part, "parts": size // part, "gen": "0" * 16}
    raw.write_full("images/app", _MAGIC + json.dumps(fields).encode())
    with pytest.raises(PoolError) as info:
        b.get("images/app", limit=64 << 20)
    assert f"is {size} bytes, over the {64 << 20} bytes" in str(info.value)
    assert len(b._ioctx.lengths) == 1  # type: ignore[attr-defined]  # the head, no part


def test_a_manifest_whose_parts_do_not_add_up_is_refused(
    backend: tuple[RadosBackend, Any],
) -> None:
    b, raw = backend
    fields = {"size": 10, "part_size": 4, "parts": 1000, "gen": "0" * 16}
    raw.write_full("lists/x", _MAGIC + json.dumps(fields).encode())
    with pytest.raises(PoolError, match="corrupted stripe manifest"):
        b.get("lists/x", limit=100)
