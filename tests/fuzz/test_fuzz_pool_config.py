"""Fuzzing pool configuration: ``key=value`` options as ``torpor pool create/set`` take them,
validated for every driver, and the configuration files in the home (hostile JSON, random
bytes, or a symlink, FIFO or directory where the file should be).

Parsing, validating, showing, saving and loading end with success or a
:class:`~torpor.TorporError`, in bounded time, writing nothing outside the home; a
configuration that validates can be shown and written, and reads back as itself.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from torpor._cli import main
from torpor._pools import _config
from torpor._pools._config import PoolConfig, parse_assignments, validate
from torpor._pools._registry import DRIVERS

from .support import DEEP_JSON, JSON_VALUES, Jail, bounded, in_child, mutated_json, scaled, verdict

ALL_KEYS = sorted({k for d in DRIVERS.values() for k in (*d.keys, *d.not_here)})

KEYS = st.one_of(
    st.sampled_from(ALL_KEYS),
    st.sampled_from(["", " source", "source ", "SOURCE", "s3", "s3.", "=", "x"]),
    st.text(max_size=12),
)

VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "/",
            "/etc",
            "relative/dir",
            "/x\0y",
            "\ud800",
            "http://[",
            "https://[::1",
            "http://",
            "ftp://x",
            "http://a:99999999",
            "0",
            "1",
            "19",
            "20",
            "-1",
            "+3",
            "٣",
            "9" * 5000,
            "true",
            "TRUE",
            "a" * 64,
            ",".join(["b" * 64] * 3) + ",",
            "bucket..name",
            "ab",
            "a" * 64,
        ]
    ),
    st.text(max_size=40),
)

ASSIGNMENTS = st.lists(
    st.one_of(st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES), st.text(max_size=20)),
    max_size=5,
)


@contextlib.contextmanager
def debug() -> Iterator[None]:
    """TORPOR_DEBUG=1: the CLI raises an unexpected error instead of exiting 70."""
    old = os.environ.get("TORPOR_DEBUG")
    os.environ["TORPOR_DEBUG"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORPOR_DEBUG", None)
        else:
            os.environ["TORPOR_DEBUG"] = old


def check_usable(cfg: PoolConfig) -> None:
    """What torpor does with a configuration that validated."""
    cfg.effective()
    shown = cfg.shown()
    assert all(isinstance(v, str) for v in shown.values())
    assert isinstance(cfg.location, str)
    again = PoolConfig.from_json(cfg.to_json(), source="fuzz")
    assert again == cfg


@given(ASSIGNMENTS)
@example(["s3.endpoint=http://["])
@example(["source=/x\0y"])
@example(["compression.level=" + "9" * 5000])
@example(["=x"])
@example(["x"])
def test_assignments_for_every_driver(items: list[str]) -> None:
    with Jail(), bounded():
        parsed = verdict(lambda: parse_assignments(items))
        if not isinstance(parsed, dict):
            return
        for driver in DRIVERS.values():
            cfg = verdict(lambda d=driver: validate("fz", d, parsed))  # type: ignore[misc]
            if isinstance(cfg, dict):
                check_usable(PoolConfig("fz", driver.name, cfg, "2026-01-01"))


@given(st.sampled_from(sorted(DRIVERS)), ASSIGNMENTS, ASSIGNMENTS)
def test_new_then_set(driver: str, first: list[str], changes: list[str]) -> None:
    """``pool create`` (its validation and save) then ``torpor pool set``."""
    with Jail(), bounded():
        cfg = verdict(lambda: _config.new_config("fz", driver, parse_assignments(first)))
        if not isinstance(cfg, PoolConfig):
            return
        _config.save(cfg, new=True)
        assert _config.load("fz") == cfg
        with debug():
            code = main(["pool", "set", "fz", "--", *changes]) if changes else 0
        assert code in (0, 1)
        check_usable(_config.load("fz"))


VALID_FILE = {
    "name": "fz",
    "driver": "dir",
    "config": {"compression.level": "5"},
    "created": "2026-01-01T00:00:00.000000+00:00",
}


@st.composite
def planted(draw: st.DrawFn) -> tuple[str, Any]:
    """What is found at ``<home>/pools/fz.json``."""
    kind = draw(st.sampled_from(["json", "json", "json", "any-json", "bytes", "deep", "other"]))
    if kind == "json":
        return kind, draw(mutated_json(VALID_FILE))
    if kind == "any-json":
        return kind, draw(JSON_VALUES)
    if kind == "bytes":
        return kind, draw(st.binary(max_size=128))
    if kind == "deep":
        return kind, draw(st.sampled_from(range(len(DEEP_JSON))))
    return kind, draw(st.sampled_from(["symlink-secret", "symlink-zero", "fifo", "dir"]))


def plant(jail: Jail, kind: str, arg: Any) -> None:
    path = jail.home / "pools" / "fz.json"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    if kind in ("json", "any-json"):
        path.write_text(json.dumps(jail.fill(arg)))
    elif kind == "bytes":
        path.write_bytes(arg)
    elif kind == "deep":
        path.write_bytes(DEEP_JSON[arg])
    elif arg == "symlink-secret":
        path.symlink_to("/etc/shadow")
    elif arg == "symlink-zero":
        path.symlink_to("/dev/zero")
    elif arg == "fifo":
        os.mkfifo(path, 0o600)
    else:
        path.mkdir(mode=0o700)


def read_planted() -> None:
    """Everything that reads a pool configuration: load, list, and the CLI."""
    os.environ["TORPOR_DEBUG"] = "1"
    with contextlib.suppress(*_TORPOR):
        _config.load("fz")
    with contextlib.suppress(*_TORPOR):
        _config.list_configs()
    assert main(["pool", "list", "--json"]) in (0, 1)
    assert main(["pool", "show", "fz", "--json"]) in (0, 1)
    assert main(["images", "--pool", "fz"]) in (0, 1)


_TORPOR: tuple[type[Exception], ...] = (__import__("torpor").TorporError,)


@scaled(0.5)
@given(planted())
@example(("deep", 0))
@example(("other", "fifo"))
@example(("other", "symlink-zero"))
@example(("json", {**VALID_FILE, "config": {"compression.level": None}}))
@example(("json", {**VALID_FILE, "config": {"source": "relative/dir"}}))
@example(("json", {**VALID_FILE, "name": "../.."}))
@example(
    (
        "json",
        {**VALID_FILE, "driver": "s3", "config": {"s3.bucket": "b", "s3.endpoint": "http://["}},
    )
)
def test_planted_configuration_files(case: tuple[str, Any]) -> None:
    # A source outside the home is a user's choice: writes there are fine; anywhere else
    # (relative to the cwd, say) they are not.
    jail = Jail(outside_allowed=True)
    plant(jail, *case)
    with jail:
        in_child(read_planted, seconds=5)
