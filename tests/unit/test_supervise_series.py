"""The checkpoint series of a supervised process in a pool (``_supervise._series``): names,
members (newest first, exact name only), the next sequence number, pruning with its garbage
collection, and the spec object ``supervision/NAME`` it publishes (the spec a resume reads, from
the members' signed manifests: test_supervise_spec_trust)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torpor._errors import UsageError
from torpor._pools import MemoryBackend, Pool
from torpor._pools._dir import DirBackend
from torpor._supervise._series import (
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


def test_the_published_spec_object_is_what_publish_spec_wrote(pool: Pool) -> None:
    # A copy for people and tools: read_spec does not trust it (test_supervise_spec_trust).
    publish_spec(pool, _SPEC)
    assert json.loads(pool.backend.get("supervision/web")) == _SPEC.to_json()
    assert read_spec(pool, "web") is None  # no member: nothing a resume could trust
