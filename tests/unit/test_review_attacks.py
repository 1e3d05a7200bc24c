"""Attacks found by the adversarial review of issue 11 (helper R), each refused.

- An image's id is a pool-side field: whoever writes to a pool may give an image any id, the
  id of an image of another pool included. The pull cache is keyed by that id, so a cached copy
  with the right id is not the image asked for unless its whole manifest is the record's: else
  an untrusted image pulled from a pool without a policy would be restored in place of a
  trusted image of a pool that requires signatures.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from torpor._identity import host_identity
from torpor._images._image import Image
from torpor._pools import Pool
from torpor._pools._dir import DirBackend
from torpor._pools._record import image_key
from torpor._pools._sign import Policy

from .test_pool_support import FAST, random_pages
from .test_pool_support import make_image as _make_image


def make_image(root: Path, name: str, seed: int) -> Image:
    return _make_image(root, name, bytes(random_pages(8, seed=seed)))


@pytest.fixture
def other_host(
    torpor_home: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], str]]:
    """Switch to another torpor home (another host identity) and back; returns the key id."""
    homes = {"here": str(torpor_home), "there": str(tmp_path_factory.mktemp("other-host"))}

    def switch(where: str) -> str:
        monkeypatch.setenv("TORPOR_HOME", homes[where])
        return host_identity().key_id

    yield switch
    monkeypatch.setenv("TORPOR_HOME", homes["here"])


def _doc(pool: Pool, name: str) -> dict[str, Any]:
    blob = pool.backend.get(image_key(name))
    return json.loads(zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 24))


def _put_doc(pool: Pool, name: str, doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    pool.backend.put(image_key(name), zstandard.ZstdCompressor().compress(raw))


def _digests(image: Image) -> dict[str, str]:
    return {f.name: f.sha256 for f in image.manifest.files}


def test_a_cached_image_of_another_pool_under_the_same_id_is_not_restored(
    tmp_path: Path, other_host: Callable[[str], str]
) -> None:
    """The attack: pool ``loose`` (no policy, writable by the attacker) holds an image made by
    an untrusted host, its id set to the id of image ``good`` of pool ``strict`` (which
    requires signatures and trusts only this host). Once root pulled the loose image, a pull of
    ``good`` from ``strict`` must still give good's content, not the cached untrusted one."""
    theirs = other_host("there")
    with Pool("loose", DirBackend(tmp_path / "loose"), timing=FAST) as loose:
        loose.push(make_image(tmp_path / "theirs", "evil", seed=2), "evil")
    mine = other_host("here")
    assert mine != theirs
    policy = Policy(require_signed=True)
    with (
        Pool("strict", DirBackend(tmp_path / "strict"), timing=FAST, policy=policy) as strict,
        Pool("loose", DirBackend(tmp_path / "loose"), timing=FAST) as loose,
    ):
        good = make_image(tmp_path / "mine", "good", seed=1)
        strict.push(good, "good")
        good_id = _doc(strict, "good")["manifest"]["id"]
        doc = _doc(loose, "evil")
        doc["manifest"]["id"] = good_id  # not covered by the signature: a pool-side field
        _put_doc(loose, "evil", doc)
        assert loose.image("evil").signer == theirs  # still a validly signed record

        evil = loose.pull("evil")
        assert evil.manifest.id == good_id
        pulled = strict.pull("good")
        pulled.verify(full=True)
        assert pulled.name == "good"
        assert pulled.signer is None  # a cache copy is not vouched for by this host
        assert _digests(pulled) == _digests(good)
        assert _digests(pulled) != _digests(evil)
        # And the other way round: the loose pool's image is its own, not good's.
        again = loose.pull("evil")
        assert _digests(again) == _digests(evil)
