"""``torpor restore`` goes lazy by default when the image's memory reaches a threshold: the
pool key ``restore.lazy_above`` for ``NAME@POOL``, ``<home>/lazy-above`` for local images;
``--lazy``/``--no-lazy`` always decide (``torpor._lazy._policy``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torpor import _paths
from torpor._cli import build_parser
from torpor._errors import PoolConfigError, UsageError
from torpor._lazy import _policy
from torpor._pools import _config, create_pool, open_pool

from .test_pool_support import make_image, random_pages

MIB = 1 << 20


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("4096", 4096), ("512MiB", 512 * MIB), ("1G", 1 << 30), ("2 gib", 2 << 30),
     ("3k", 3 << 10), ("7B", 7), ("1TiB\n", 1 << 40)],
)  # fmt: skip
def test_sizes(text: str, size: int) -> None:
    assert _policy.parse_size(text, source="x") == size


@pytest.mark.parametrize("text", ["", "-1", "1.5G", "1 PB", "1GG", "lots", "9" * 16])
def test_bad_sizes_are_refused_naming_the_source(text: str) -> None:
    with pytest.raises(UsageError, match=r"^<here>: .* is not a size — write a whole number"):
        _policy.parse_size(text, source="<here>")


def _local(tmp_path: Path, pages: int) -> str:
    image = make_image(_paths.images_dir(), "big", bytes(random_pages(pages)))
    return str(image.path)


def test_a_local_image_goes_lazy_at_the_homes_threshold(tmp_path: Path, torpor_home: Path) -> None:
    arg = _local(tmp_path, 512)  # 2 MiB of pages
    assert not _policy.lazy_by_default(arg)  # no threshold: never
    for text, lazy in (("2MiB", True), ("1M", True), ("0", True), ("3M", False)):
        _paths.write_home_file(_policy.HOME_FILE, text.encode())
        assert _policy.lazy_by_default(arg) is lazy, text
    os.chmod(torpor_home / _policy.HOME_FILE, 0o666)  # writable by others: not believed
    assert not _policy.lazy_by_default(arg)


def test_a_pool_image_goes_lazy_at_the_pools_threshold(tmp_path: Path, torpor_home: Path) -> None:
    create_pool("p", "dir", {"restore.lazy_above": "1MiB"})
    with open_pool("p") as pool:
        pool.push(make_image(tmp_path / "img", "app", bytes(random_pages(512))), "app")
    assert _policy.lazy_by_default("app@p")
    _config.save(_config.updated(_config.load("p"), {"restore.lazy_above": "3M"}), new=False)
    assert not _policy.lazy_by_default("app@p")
    _config.save(_config.updated(_config.load("p"), {"restore.lazy_above": ""}), new=False)
    assert not _policy.lazy_by_default("app@p")  # unset: never


def test_a_bad_pool_threshold_is_refused_when_set(torpor_home: Path) -> None:
    with pytest.raises(PoolConfigError, match=r"restore\.lazy_above"):
        create_pool("q", "dir", {"restore.lazy_above": "lots"})


def test_lazy_and_no_lazy_decide_and_neither_leaves_it_to_the_policy() -> None:
    def parsed(*extra: str) -> object:
        return build_parser(["restore"]).parse_args(["restore", "img", *extra]).lazy

    assert (parsed(), parsed("--lazy"), parsed("--no-lazy")) == (None, True, False)
