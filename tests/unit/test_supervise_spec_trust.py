"""The supervision spec another host resumes with, and the interval's lower bound (review
finding 7). ``torpor resume NAME@POOL`` reads the spec with ``_series.read_spec``: from the
signed manifest of the newest series member that carries one, checked as a restore checks that
image, never from the unsigned pool object ``supervision/NAME``. An interval under 100ms
(``_spec.MIN_INTERVAL``), 0 aside, is refused by the CLI and by every spec read."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from torpor._cli import main
from torpor._errors import ImageCorruptedError, PoolError, SignatureError, UsageError
from torpor._images import _manifest
from torpor._images._image import staging
from torpor._pools import MemoryBackend, Pool
from torpor._pools._record import image_key
from torpor._pools._sign import Policy
from torpor._supervise import _series
from torpor._supervise._spec import MIN_INTERVAL, Spec, SupervisionRecordError

from .test_pool_support import FAST

SPEC = Spec(name="web", command=("python3", "app.py"), interval=10.0, keep=4)


# -- the interval's lower bound ---------------------------------------------------------------


def test_the_bound_is_100ms() -> None:
    assert MIN_INTERVAL == 0.1


@pytest.mark.parametrize("value", [0.0, 0.1, 0.5])
def test_zero_and_intervals_from_the_bound_are_accepted(value: float) -> None:
    assert Spec.from_json({**SPEC.to_json(), "interval": value}, source="s").interval == value
    assert Spec(name="web", command=("x",), interval=value).interval == value


@pytest.mark.parametrize(("value", "shown"), [(1e-9, "1e-09"), (0.099, "0.099")])
def test_a_shorter_interval_is_refused_where_a_spec_is_read(value: float, shown: str) -> None:
    with pytest.raises(SupervisionRecordError) as caught:
        Spec.from_json({**SPEC.to_json(), "interval": value}, source="pool 'p' object x")
    assert caught.value.msg == (
        f"supervision spec in pool 'p' object x has a bad interval: {shown} s is shorter than "
        "100ms; refused"
    )


@pytest.mark.parametrize("every", ["1ms", "0.000000001s", "99ms"])
def test_the_cli_refuses_a_shorter_interval_in_one_line(
    every: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("TORPOR_HOME", str(home))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert main(["run", "--name", "u", "--checkpoint-every", every, "--", "true"]) == 1
    out, err = capsys.readouterr()
    seconds = {"1ms": "0.001", "0.000000001s": "1e-09", "99ms": "0.099"}[every]
    assert (out, err) == (
        "",
        f"torpor: error: --checkpoint-every {seconds} s is shorter than 100ms — checkpoint "
        "every 100ms or more (500ms, 10s, 5m), or 0: only when the app asks\n",
    )
    assert not (home / "procs").exists() or list((home / "procs").iterdir()) == []


def test_the_cli_accepts_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from torpor._cli._supervise import add_options, spec_from

    monkeypatch.setenv("TORPOR_HOME", str(tmp_path / "home"))
    p = argparse.ArgumentParser()
    add_options(p, interval_required=True)
    spec = spec_from(p.parse_args(["--checkpoint-every", "100ms"]), "n", ("x",))
    assert spec.interval == 0.1


# -- the spec a resume reads --------------------------------------------------------------


@pytest.fixture
def pool(torpor_home: Path) -> Pool:
    return Pool("mem", MemoryBackend(), timing=FAST)


def _push(pool: Pool, root: Path, image: str, supervision: dict[str, Any] | None) -> None:
    """A checkpoint ``image`` pushed into ``pool``, its manifest carrying ``supervision``
    (signed with it: the local image is signed here, or by the push)."""
    root.mkdir(parents=True, exist_ok=True)
    with staging(root / image) as st:
        (st.path / "pages-1.img").write_bytes(os.urandom(8192))
        (st.path / "inventory.img").write_bytes(b"inv")
        local = st.commit(
            lambda entries: _manifest.build(
                name=image, pid=4242, files=entries, criu_version="4.2.1",
                cmdline=("python3", "app.py"), rss_bytes=8192,
            ).evolve(supervision=supervision)
        )  # fmt: skip
    pool.push(local, image)


def _rewrite(pool: Pool, image: str, **changes: Any) -> None:
    """Change the stored pool record of ``image`` (what a writer without the key can do)."""
    rec = pool._record(image)
    pool.backend.put(image_key(image), replace(rec, **changes).encode())


def test_the_newest_members_signed_spec_is_resumed_not_the_pool_object(
    pool: Pool, tmp_path: Path
) -> None:
    _push(pool, tmp_path, "web.s000001", SPEC.to_json())
    newer = replace(SPEC, keep=7)
    _push(pool, tmp_path, "web.s000002", newer.to_json())
    # Anyone who can write to the pool can write this one: it is not what a resume uses.
    forged = replace(SPEC, command=("sh", "-c", "evil"), keep=1)
    _series.publish_spec(pool, forged)
    assert _series.read_spec(pool, "web") == newer


def test_no_member_no_spec_whatever_the_pool_object(pool: Pool) -> None:
    _series.publish_spec(pool, SPEC)
    assert _series.read_spec(pool, "web") is None


def test_a_newest_member_without_a_spec_leaves_it_to_the_one_before(
    pool: Pool, tmp_path: Path
) -> None:
    _push(pool, tmp_path, "web.s000001", SPEC.to_json())
    _push(pool, tmp_path, "web.s000002", None)  # its spec could not be read when it was made
    _push(pool, tmp_path, "webx.s000003", replace(SPEC, name="webx").to_json())  # another's
    assert _series.read_spec(pool, "web") == SPEC


def test_a_spec_changed_in_the_pool_record_is_refused(pool: Pool, tmp_path: Path) -> None:
    _push(pool, tmp_path, "web.s000001", SPEC.to_json())
    rec = pool._record("web.s000001")
    forged = replace(SPEC, command=("sh", "-c", "evil"))
    _rewrite(pool, "web.s000001", manifest=rec.manifest.evolve(supervision=forged.to_json()))
    with pytest.raises(ImageCorruptedError) as caught:
        _series.read_spec(pool, "web")
    assert caught.value.msg == (
        "the manifest of image 'web.s000001' in pool 'mem' is damaged (its manifest is not the "
        "one that was signed)"
    )


def test_an_unsigned_member_is_refused_where_the_pool_requires_signatures(
    pool: Pool, tmp_path: Path
) -> None:
    _push(pool, tmp_path, "web.s000001", SPEC.to_json())
    _rewrite(pool, "web.s000001", origin=None)
    # As trusted as the image a restore would use: a pool without a policy restores it.
    assert _series.read_spec(pool, "web") == SPEC
    strict = Pool("mem", pool.backend, timing=FAST, policy=Policy(require_signed=True))
    with pytest.raises(SignatureError) as caught:
        _series.read_spec(strict, "web")
    assert caught.value.msg.startswith("image 'web.s000001' in pool 'mem' is not signed")


def test_a_signed_spec_of_another_name_is_refused(pool: Pool, tmp_path: Path) -> None:
    _push(pool, tmp_path, "web.s000001", replace(SPEC, name="other").to_json())
    with pytest.raises(PoolError) as caught:
        _series.read_spec(pool, "web")
    assert caught.value.msg == (
        "image 'web.s000001' in pool 'mem' carries the supervision spec of 'other', not of "
        "'web'; refused"
    )


def test_a_signed_spec_with_a_bad_value_is_refused_naming_the_image(
    pool: Pool, tmp_path: Path
) -> None:
    _push(pool, tmp_path, "web.s000001", {**SPEC.to_json(), "interval": 1e-9})
    with pytest.raises(SupervisionRecordError) as caught:
        _series.read_spec(pool, "web")
    assert caught.value.msg == (
        "supervision spec in image 'web.s000001' in pool 'mem' has a bad interval: 1e-09 s is "
        "shorter than 100ms; refused"
    )


def test_keep_1_stays_valid() -> None:
    # Not a constraint: with keep 1 a crash loop has nothing to fall back to and gives up,
    # which the policy says in one line; the app and its one checkpoint are kept.
    assert Spec(name="web", command=("x",), keep=1).keep == 1
    with pytest.raises(UsageError):
        Spec(name="web", command=("x",), keep=0)
