"""A signature policy on a real Ceph pool: two torpor homes (two host identities) share one
RADOS pool; with ``security.require_signed=true`` an image pushed by the untrusted host is
refused before any pack is read from the cluster, and pulls once its key is trusted."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from torpor._errors import SignatureError
from torpor._identity import host_identity
from torpor._images import _manifest
from torpor._images._image import Image, staging
from torpor._pools import Pool, create_pool, delete_pool, open_pool, set_pool

pytestmark = pytest.mark.ceph


class NoPackReads:
    """A backend wrapper failing the test if a pack or chunk list is read."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.got: list[str] = []

    def _check(self, key: str) -> None:
        self.got.append(key)
        if key.startswith(("packs/", "lists/")):
            raise AssertionError(f"{key} was read from the cluster")

    def get(self, key: str, limit: int | None = None) -> bytes:
        self._check(key)
        data: bytes = self.inner.get(key, limit)
        return data

    def get_stream(self, key: str) -> BinaryIO:
        self._check(key)
        stream: BinaryIO = self.inner.get_stream(key)
        return stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _image(root: Path) -> Image:
    files = {
        "pages-1.img": os.urandom(200 * 4096),  # a chunk list object, not inline
        "inventory.img": b"inv",
        "pstree.img": b"tree",
        "core-1.img": b"core" * 100,
    }
    with staging(root / "img") as st:
        for name, data in files.items():
            (st.path / name).write_bytes(data)
        return st.commit(
            lambda entries: _manifest.build(
                name="img", pid=1, files=entries, criu_version="4.2.1",
                cmdline=("app",), rss_bytes=200 * 4096,
            )
        )  # fmt: skip


@pytest.fixture
def rados_config(ceph_cluster: dict[str, Any], rados_module: Any) -> Iterator[dict[str, str]]:
    yield {
        "ceph.conf": ceph_cluster["conf"],
        "ceph.user.name": ceph_cluster["rados_user"],
        "ceph.osd.pool_name": f"torpor-signed-{uuid.uuid4().hex[:8]}",
        "ceph.osd.pg_num": "8",
    }


def test_require_signed_on_ceph(
    torpor_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    rados_config: dict[str, str],
) -> None:
    # The maker: another home, so another host key.
    maker = tmp_path_factory.mktemp("maker-host")
    monkeypatch.setenv("TORPOR_HOME", str(maker))
    maker_key = host_identity().key_id
    create_pool("shared", "ceph", rados_config)
    with open_pool("shared") as pool:
        assert pool.push(_image(tmp_path_factory.mktemp("local")), "web").signer == maker_key

    monkeypatch.setenv("TORPOR_HOME", str(torpor_home))
    assert host_identity().key_id != maker_key
    create_pool("shared", "ceph", rados_config)  # adopts the maker's RADOS pool
    try:
        set_pool("shared", {"security.require_signed": "true"})
        with open_pool("shared") as pool:
            guarded = NoPackReads(pool.backend)
            strict = Pool("shared", guarded, policy=pool.policy)  # type: ignore[arg-type]
            with pytest.raises(SignatureError) as info:
                strict.pull("web")
            assert str(info.value) == (
                f"image 'web' in pool 'shared' is signed by key {maker_key}, which pool"
                f" 'shared' does not trust; refused — if that host is trusted:"
                f" torpor pool set shared security.trusted_keys={maker_key}"
            )
            assert [k for k in guarded.got if k.startswith(("packs/", "lists/"))] == []
        set_pool("shared", {"security.trusted_keys": maker_key})
        with open_pool("shared") as pool:
            pulled = pool.pull("web")
            pulled.verify(full=True)
            assert pulled.name == "web"
    finally:
        delete_pool("shared", force=True)
