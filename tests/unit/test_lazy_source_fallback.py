"""A pool page source whose record's ``where`` names a pack that is gone (a collection
repacked it) falls back to the pool's catalog, read once: another thread faulting meanwhile
waits for it instead of meeting no places and no catalog, and a catalog that cannot be read
is the chunk's error (naming it), tried again at the next fault.

A logic test: the source's fetching is stubbed (its real paths: test_pool_where.py and the
real lazy pool tests)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from torpor._lazy._source import _HINT, LazyPageError, PoolSource
from torpor._pools._located import Stale


class _Pool:
    name = "p"

    def __init__(self, fail: int = 0) -> None:
        self.reads = 0
        self.fail = fail

    def _catalog(self) -> str:
        self.reads += 1
        time.sleep(0.3)  # as a pool's every index: 0.1-0.9 s
        if self.reads <= self.fail:
            raise OSError(5, "Input/output error")
        return f"catalog {self.reads}"


def _source(pool: _Pool) -> tuple[PoolSource, list[tuple[str, bytes]]]:
    src: Any = object.__new__(PoolSource)
    src.pool, src.name = pool, "img"
    src._located, src._catalog, src._prepared = object(), None, None
    src._locks_lock, src._catalog_lock = threading.Lock(), threading.Lock()
    loaded: list[tuple[str, bytes]] = []

    def stale(*_: object) -> bool:
        raise Stale("pack gone")

    def load_from(catalog: str, d: bytes, file: str, i: int, *, last: bool) -> bool:
        loaded.append((catalog, d))
        return False

    src._load_located, src._load_from = stale, load_from
    return src, loaded


def test_a_thread_faulting_while_the_catalog_is_read_waits_for_it() -> None:
    pool = _Pool()
    src, loaded = _source(pool)
    errors: list[BaseException] = []

    def fault(d: bytes) -> None:
        try:
            src._load(d, "pages-1.img", 0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    first = threading.Thread(target=fault, args=(b"a",))
    first.start()
    time.sleep(0.05)  # the first is reading the catalog
    fault(b"b")
    first.join()
    assert errors == []
    assert sorted(loaded) == [("catalog 1", b"a"), ("catalog 1", b"b")]
    assert pool.reads == 1


def test_a_catalog_that_cannot_be_read_is_the_chunks_error_and_is_tried_again() -> None:
    pool = _Pool(fail=1)
    src, loaded = _source(pool)
    with pytest.raises(LazyPageError) as err:
        src._load(b"\x01" * 32, "pages-1.img", 7)
    assert str(err.value) == (
        f"image 'img' in pool 'p': file pages-1.img, chunk 7 (sha256 {'01' * 32}) cannot be "
        f"found: the pool's indexes: [Errno 5] Input/output error — {_HINT}"
    )
    src._load(b"\x02" * 32, "pages-1.img", 8)
    assert loaded == [("catalog 2", b"\x02" * 32)]
