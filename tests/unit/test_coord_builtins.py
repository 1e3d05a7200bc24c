"""The built-in resources for the standard library, and the package's exports."""

from __future__ import annotations

import logging
import platform
import random
import ssl
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import torpor._coord as coord
from torpor._coord import Context, configure_builtins
from torpor._coord._builtins import _BUILTINS
from torpor._errors import UsageError


@pytest.fixture
def ctx() -> Iterator[Context]:
    """A context holding the built-ins, as torpor's system context does."""
    c = Context("builtins")
    for b in _BUILTINS.values():
        c._register_strong(b)
    state = configure_builtins()
    yield c
    configure_builtins(**state)


def cycle(ctx: Context) -> None:
    ctx.before_checkpoint()
    ctx.after_restore()


def test_random_streams_differ_after_restore(ctx: Context) -> None:
    random.seed(1234)
    state = random.getstate()
    cycle(ctx)
    after = random.random()
    random.setstate(state)
    assert after != random.random()


def test_numpy_legacy_generator_is_reseeded(ctx: Context) -> None:
    np = pytest.importorskip("numpy")
    np.random.seed(7)
    expected = np.random.random()
    np.random.seed(7)
    cycle(ctx)
    assert np.random.random() != expected


def test_random_builtin_can_be_switched_off(ctx: Context) -> None:
    configure_builtins(random=False)
    random.seed(99)
    state = random.getstate()
    cycle(ctx)
    assert random.getstate() == state


def test_ssl_is_fed_entropy(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    fed: list[tuple[bytes, float]] = []
    monkeypatch.setattr(ssl, "RAND_add", lambda data, n: fed.append((data, n)))
    cycle(ctx)
    assert len(fed) == 1 and len(fed[0][0]) == 48


def test_uuid_and_tempfile_and_platform_caches_are_dropped(ctx: Context) -> None:
    uuid.getnode()
    uuid.uuid1()
    next(tempfile._get_candidate_names())  # type: ignore[attr-defined]
    platform.uname()
    cycle(ctx)
    assert uuid._node is None  # type: ignore[attr-defined]
    assert uuid._generate_time_safe is None  # type: ignore[attr-defined]
    assert tempfile._name_sequence is None  # type: ignore[attr-defined]
    assert platform._uname_cache is None  # type: ignore[attr-defined]
    a, b = uuid.uuid1(), uuid.uuid1()
    assert a != b and a.node == uuid.getnode()


def test_log_files_are_closed_before_and_reopened_after(ctx: Context, tmp_path: Path) -> None:
    logger = logging.getLogger("torpor-test-builtins")
    handler = logging.FileHandler(tmp_path / "app.log", mode="w")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("before")
        ctx.before_checkpoint()
        assert handler.stream is None
        ctx.after_restore()
        assert handler.stream is not None and handler.mode == "a"
        logger.info("after")
        handler.flush()
        assert (tmp_path / "app.log").read_text() == "before\nafter\n"
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_unknown_builtin_names_are_refused() -> None:
    with pytest.raises(UsageError, match="unknown built-in"):
        configure_builtins(rnadom=False)
    assert set(configure_builtins()) == {
        "random",
        "uuid",
        "tempfile",
        "platform",
        "logging",
        "stdio",
    }


def test_exports() -> None:
    assert sorted(coord.__all__) == coord.__all__
    for name in coord.__all__:
        assert getattr(coord, name).__doc__, name
