"""The ``ceph`` pool driver against a real cluster: the conformance suite, then its layout."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conformance.backend_suite import MIB, STRIPED, BackendConformance, payload

from torpor._errors import PoolConfigError, PoolError
from torpor._pools._rados import _MAGIC, RadosBackend

pytestmark = pytest.mark.ceph

POOL = "torpor-tests"


def objects(ioctx: Any, namespace: str) -> set[str]:
    """Every RADOS object in ``namespace`` of the test pool: keys and stripe parts alike."""
    ioctx.set_namespace(namespace)
    return {o.key for o in ioctx.list_objects()}


def make_backend(info: dict[str, Any], namespace: str, **kwargs: Any) -> RadosBackend:
    return RadosBackend(
        info["conf"], info["cluster"], info["rados_user"], POOL, 8, namespace=namespace, **kwargs
    )


@pytest.fixture
def namespace(admin_ioctx: Any) -> Iterator[str]:
    """A fresh RADOS namespace for one test, emptied afterwards (memstore lives in RAM)."""
    ns = f"t-{uuid.uuid4().hex[:12]}"
    yield ns
    for name in objects(admin_ioctx, ns):
        admin_ioctx.remove_object(name)


class TestRadosBackend(BackendConformance):
    @pytest.fixture
    def backend(self, ceph_cluster: dict[str, Any], namespace: str) -> Iterator[RadosBackend]:
        b = make_backend(ceph_cluster, namespace)
        yield b
        b.close()

    # RADOS has no per-object permissions to check: access is granted per pool by the cephx
    # caps of the user (the cluster's keyring), which the driver does not set.
    test_objects_are_private = None  # type: ignore[assignment]


def test_small_values_are_plain_objects(
    ceph_cluster: dict[str, Any], namespace: str, admin_ioctx: Any
) -> None:
    b = make_backend(ceph_cluster, namespace)
    b.put("plain", b"hello")
    assert objects(admin_ioctx, namespace) == {"plain"}
    assert admin_ioctx.read("plain") == b"hello"
    assert admin_ioctx.get_xattr("plain", "torpor.size") == b"5"
    b.close()


def test_large_values_are_striped_head_last_and_cleaned_up(
    ceph_cluster: dict[str, Any], namespace: str, admin_ioctx: Any
) -> None:
    b = make_backend(ceph_cluster, namespace, stripe_size=MIB)
    value = payload(3 * MIB + 1)
    b.put("big", value)
    names = objects(admin_ioctx, namespace)
    parts = sorted(n for n in names if n != "big")
    assert len(parts) == 4 and all(n.startswith("big@") for n in parts)
    assert admin_ioctx.read("big", 4096).startswith(_MAGIC)
    assert b.get("big") == value and b.size("big") == len(value)

    b.put_stream("big", io.BytesIO(value[::-1]))  # overwrite: new parts, old ones removed
    new_parts = objects(admin_ioctx, namespace) - {"big"}
    assert len(new_parts) == 4 and not new_parts & set(parts)
    assert b.get("big") == value[::-1]

    b.put("big", b"small again")
    assert objects(admin_ioctx, namespace) == {"big"}
    b.put("big", value)
    b.delete("big")
    assert objects(admin_ioctx, namespace) == set()
    b.close()


def test_a_value_that_looks_like_a_manifest_round_trips(
    ceph_cluster: dict[str, Any], namespace: str
) -> None:
    b = make_backend(ceph_cluster, namespace)
    tricky = _MAGIC + b'{"size": 1, "part_size": 1, "parts": 1, "gen": "x"}'
    b.put("tricky", tricky)
    assert b.get("tricky") == tricky
    assert b.size("tricky") == len(tricky)
    b.put_stream("tricky2", io.BytesIO(tricky))
    assert b.get("tricky2") == tricky
    b.close()


def test_reads_do_not_depend_on_the_readers_stripe_size(
    ceph_cluster: dict[str, Any], namespace: str
) -> None:
    writer = make_backend(ceph_cluster, namespace, stripe_size=8 * MIB)
    reader = make_backend(ceph_cluster, namespace, stripe_size=MIB)
    plain, striped = payload(6 * MIB, seed=1), payload(20 * MIB + 3, seed=2)
    writer.put("plain", plain)
    writer.put("striped", striped)
    assert reader.get("plain") == plain
    assert reader.get("striped") == striped
    with reader.get_stream("striped") as stream:
        assert stream.read() == striped
    writer.close()
    reader.close()


def test_objects_written_by_other_tools_are_readable(
    ceph_cluster: dict[str, Any], namespace: str, admin_ioctx: Any
) -> None:
    admin_ioctx.set_namespace(namespace)
    foreign = payload(5 * MIB, seed=3)
    admin_ioctx.write_full("foreign", foreign)
    b = make_backend(ceph_cluster, namespace)
    assert b.get("foreign") == foreign
    assert b.size("foreign") == len(foreign)
    admin_ioctx.write_full("not a key!", b"x")
    assert list(b.list()) == ["foreign"]
    b.close()


def test_stream_fails_cleanly_when_the_value_is_replaced_under_it(
    ceph_cluster: dict[str, Any], namespace: str
) -> None:
    b = make_backend(ceph_cluster, namespace, stripe_size=MIB)
    b.put("moving", payload(STRIPED))
    stream = b.get_stream("moving")
    stream.read(10)
    b.put("moving", payload(STRIPED, seed=9))  # deletes the parts the stream is reading
    with pytest.raises(PoolError, match="overwritten or deleted while being read"):
        stream.read()
    stream.close()
    b.close()


def test_pool_is_created_with_pg_num_and_application(
    ceph_cluster: dict[str, Any], rados_module: Any
) -> None:
    name = f"torpor-new-{uuid.uuid4().hex[:6]}"
    b = RadosBackend(ceph_cluster["conf"], ceph_cluster["cluster"], ceph_cluster["rados_user"],
                     name, 4)  # fmt: skip
    b.put("k", b"v")
    b.close()
    ceph = ["ceph", "-c", ceph_cluster["conf"], "-n", "client.admin", "--format", "json"]
    try:
        pg = json.loads(subprocess.check_output([*ceph, "osd", "pool", "get", name, "pg_num"]))
        apps = json.loads(subprocess.check_output([*ceph, "osd", "pool", "application", "get",
                                                   name]))  # fmt: skip
        assert pg["pg_num"] == 4
        assert "torpor" in apps
    finally:
        subprocess.run([*ceph, "osd", "pool", "rm", name, name, "--yes-i-really-really-mean-it"],
                       check=True, capture_output=True)  # fmt: skip


def test_unknown_user_is_a_pool_error(ceph_cluster: dict[str, Any]) -> None:
    with pytest.raises(PoolError, match="cannot connect") as info:
        RadosBackend(ceph_cluster["conf"], ceph_cluster["cluster"], "client.nobody", POOL, 8,
                     connect_timeout=3)  # fmt: skip
    assert info.value.__cause__ is not None


def test_missing_conf_is_a_pool_error(tmp_path: Any, rados_module: Any) -> None:
    with pytest.raises(PoolError, match="cannot connect"):
        RadosBackend(tmp_path / "none.conf", "ceph", "client.admin", POOL, 8, connect_timeout=3)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"pg_num": 0}, "pg_num"), ({"stripe_size": 100}, "stripe_size"),
     ({"stripe_size": 128 * MIB}, "stripe_size"), ({"workers": 0}, "workers")],
)  # fmt: skip
def test_bad_configuration(kwargs: dict[str, Any], key: str) -> None:
    args = {"conf_path": "/nonexistent", "pool_name": POOL, **kwargs}
    with pytest.raises(PoolConfigError) as info:
        RadosBackend(**args)
    assert info.value.key == key


def test_missing_rados_module_is_a_pool_error_with_a_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "rados", None)
    with pytest.raises(PoolError, match="needs the `rados` Python module") as info:
        RadosBackend("/nonexistent", "ceph", "client.admin", POOL, 8)
    assert info.value.hint is not None and "python3-rados" in info.value.hint


def test_an_unreachable_cluster_fails_within_the_connect_timeout(
    ceph_cluster: dict[str, Any], tmp_path: Any
) -> None:
    # The cluster's own configuration and keyring, its monitors moved to a port nothing
    # listens on: python-rados ignores connect()'s timeout and hung here for minutes.
    import re
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    text = Path(ceph_cluster["conf"]).read_text(encoding="utf-8")
    moved, n = re.subn(r"(?m)^(\s*mon[ _]host\s*=).*$", rf"\1 v2:127.0.0.1:{port}", text)
    assert n == 1, text
    conf = tmp_path / "unreachable.conf"
    conf.write_text(moved)
    started = time.monotonic()
    with pytest.raises(PoolError, match="cannot connect"):
        RadosBackend(conf, ceph_cluster["cluster"], ceph_cluster["rados_user"], POOL, 8,
                     connect_timeout=3)  # fmt: skip
    assert time.monotonic() - started < 20
