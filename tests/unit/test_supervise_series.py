"""The checkpoint series of a supervised process in a pool (``_supervise._series``): names,
members (newest first, exact name only), the next sequence number, pruning with its garbage
collection, and the spec object ``supervision/NAME`` read back as hostile input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torpor._errors import PoolError, TorporError, UsageError
from torpor._pools import MemoryBackend, Pool
from torpor._pools._dir import DirBackend
from torpor._supervise._series import (
    MAX_SPEC_BYTES,
    members,
    next_seq,
    parse_series_name,
    prune,
    publish_spec,
    read_spec,
    series_name,
)
from torpor._supervise._spec import Spec

from .test_pool_support import FAST, make_image, random_pages, stored_total


def test_series_names_round_trip() -> None:
    assert series_name("web", 1) == "web.s000001"
    assert series_name("web", 1234567) == "web.s1234567"
    assert parse_series_name("web.s000001") == ("web", 1)
    assert parse_series_name("web.s1234567") == ("web", 1234567)
    # A name with dots and series-like parts: the last suffix is the sequence number.
    assert parse_series_name("a.s000001.s000002") == ("a.s000001", 2)


@pytest.mark.parametrize(
    "image",
    ["web", "web.s00001", "web.s000000", "web.s0000001", "web.s00000a", ".s000001", "web.s-00001"],
)
def test_other_names_are_not_members(image: str) -> None:
    assert parse_series_name(image) is None


def test_sequence_numbers_start_at_one() -> None:
    with pytest.raises(UsageError):
        series_name("web", 0)


@pytest.fixture
def pool(torpor_home: Path) -> Pool:
    return Pool("mem", MemoryBackend(), timing=FAST)


def _push(pool: Pool, tmp_path: Path, name: str, seed: int) -> None:
    image = make_image(tmp_path, f"local-{name}", bytes(random_pages(64, seed=seed)))
    pool.push(image, name)


def test_members_are_newest_first_and_exactly_the_name(pool: Pool, tmp_path: Path) -> None:
    for image, seed in [
        ("web.s000002", 1),
        ("web.s000010", 2),
        ("web.s000001", 3),
        ("webx.s000005", 4),  # another process whose name starts the same
        ("web.s000003.s000001", 5),  # the series of "web.s000003"
        ("web-old", 6),  # not a member at all
    ]:
        _push(pool, tmp_path, image, seed)
    assert [i.name for i in members(pool, "web")] == ["web.s000010", "web.s000002", "web.s000001"]
    assert [i.name for i in members(pool, "web.s000003")] == ["web.s000003.s000001"]
    assert next_seq(pool, "web") == 11
    assert next_seq(pool, "webx") == 6
    assert next_seq(pool, "nobody") == 1
    assert members(pool, "nobody") == []


def test_prune_keeps_the_newest_and_collects_their_chunks(pool: Pool, tmp_path: Path) -> None:
    for seq in range(1, 6):
        _push(pool, tmp_path, series_name("web", seq), seq)
    _push(pool, tmp_path, "webx.s000001", 99)
    before = stored_total(pool.backend)
    assert prune(pool, "web", 2) == ["web.s000001", "web.s000002", "web.s000003"]
    assert [i.name for i in members(pool, "web")] == ["web.s000005", "web.s000004"]
    assert [i.name for i in members(pool, "webx")] == ["webx.s000001"]
    # The collection ran: the deleted images' own chunks (random pages) are gone.
    assert stored_total(pool.backend) < before * 0.75
    assert pool.pull("web.s000004").manifest.name == "web.s000004"
    # Nothing more to delete: nothing deleted, no collection needed.
    assert prune(pool, "web", 2) == []


def test_prune_deletes_a_member_whose_manifest_is_damaged(pool: Pool, tmp_path: Path) -> None:
    for seq in (1, 2):
        _push(pool, tmp_path, series_name("web", seq), seq)
    pool.backend.put("images/web.s000001", b"not a manifest")
    assert [i.name for i in members(pool, "web")] == ["web.s000002"]
    assert next_seq(pool, "web") == 3
    assert prune(pool, "web", 1) == ["web.s000001"]
    assert not pool.backend.exists("images/web.s000001")


def test_prune_keeps_at_least_one(pool: Pool) -> None:
    with pytest.raises(UsageError):
        prune(pool, "web", 0)


def test_prune_in_a_dir_pool(torpor_home: Path, tmp_path: Path) -> None:
    dir_pool = Pool("d", DirBackend(tmp_path / "pool"), timing=FAST)
    for seq in range(1, 4):
        _push(dir_pool, tmp_path, series_name("job", seq), seq)
    assert prune(dir_pool, "job", 1) == ["job.s000001", "job.s000002"]
    assert [i.name for i in members(dir_pool, "job")] == ["job.s000003"]


_SPEC = Spec(name="web", command=("python3", "app.py"), interval=10.0, keep=4)


def test_spec_round_trips_through_the_pool(pool: Pool) -> None:
    assert read_spec(pool, "web") is None
    publish_spec(pool, _SPEC)
    assert read_spec(pool, "web") == _SPEC
    publish_spec(pool, Spec(name="web", command=("python3", "app.py"), keep=1))
    spec = read_spec(pool, "web")
    assert spec is not None and spec.keep == 1


@pytest.mark.parametrize(
    "blob",
    [
        b"{not json",
        b"[" * 100_000,
        json.dumps({**_SPEC.to_json(), "keep": -1}).encode(),
        json.dumps({**_SPEC.to_json(), "command": []}).encode(),
        json.dumps({**_SPEC.to_json(), "name": "other"}).encode(),
        json.dumps({**_SPEC.to_json(), "name": "../web"}).encode(),
        b" " * (MAX_SPEC_BYTES + 1),
    ],
)
def test_a_hostile_spec_object_is_refused_in_one_line(pool: Pool, blob: bytes) -> None:
    pool.backend.put("supervision/web", blob)
    with pytest.raises(TorporError) as caught:
        read_spec(pool, "web")
    assert "\n" not in str(caught.value)
    assert "supervision/web" in str(caught.value)


def test_a_spec_of_another_name_is_refused(pool: Pool) -> None:
    publish_spec(pool, Spec(name="other", command=("x",)))
    pool.backend.put("supervision/web", pool.backend.get("supervision/other"))
    with pytest.raises(PoolError, match="the spec of 'other', not of 'web'"):
        read_spec(pool, "web")


def test_a_spec_object_that_grows_after_its_size_was_read_is_refused_unread(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool.backend.put("supervision/web", b" " * (MAX_SPEC_BYTES + 1))
    monkeypatch.setattr(pool.backend, "size", lambda key: 2)  # it was small when asked
    with pytest.raises(PoolError) as caught:
        read_spec(pool, "web")
    assert "\n" not in str(caught.value)
    assert "supervision/web" in str(caught.value) and str(MAX_SPEC_BYTES) in str(caught.value)
