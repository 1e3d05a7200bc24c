"""The startup sweep of a migration server (``torpor._migrate._serve_sweep._sweep``) in a
real home: it removes the received images and staging directories a killed server left, as
the server names them, and nothing else of the images directory (an image a user named
``db.migrating-2`` stays). nftables is a fake here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torpor._images import _manifest
from torpor._images._image import Image, Staging, staging
from torpor._migrate import _netlock, _serve_sweep


def make_image(root: Path, name: str) -> Image:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with staging(root / name) as st_:
        for fname in ("inventory.img", "pstree.img"):
            (st_.path / fname).write_bytes(fname.encode())
        return st_.commit(
            lambda entries: _manifest.build(
                name=name, pid=4242, files=entries, criu_version="4.2.1",
                cmdline=("app",), rss_bytes=1,
            )
        )  # fmt: skip


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("TORPOR_HOME", str(home))
    monkeypatch.setattr(_netlock, "_nft", lambda *a, **k: json.dumps({"nftables": []}))
    return home / "images"


KEPT = [
    "db.migrating-2",  # check_name allows it: a user's image
    "db.migrating-0a1b2c3dX",
    "db.migrating-0A1B2C3D",
    "db.migrating-",
    ".migrating-0a1b2c3d",  # no process name
    "x.migrating-0a1b2c3d.partial-0a1b2c3d",  # a staging name without its leading dot
    ".db.migrating-2.partial-0a1b2c3d",
    "a..b.migrating-0a1b2c3d",  # not a process name
    "web",
]


def test_the_sweep_removes_what_the_server_made_and_nothing_else(images: Path) -> None:
    for name in KEPT:
        make_image(images, name)
    received = make_image(images, _serve_sweep.in_transit("db").name)  # sealed, not restored
    half = Staging(_serve_sweep.in_transit("db.migrating-2"))  # half-received
    half.create()
    (half.path / "pages-1.img").write_bytes(b"x")
    also = [received.path.name, half.path.name, "app.v2.migrating-deadbeef"]
    (images / also[2]).mkdir(mode=0o700)
    logged: list[str] = []
    _serve_sweep._sweep(logged.append)
    assert sorted(p.name for p in images.iterdir()) == sorted(KEPT)
    for name in KEPT:
        Image.open(images / name)  # whole, still
    assert len(logged) == 3 and all("left by a migration that did not finish" in x for x in logged)


def test_in_transit_names_are_known_and_only_those() -> None:
    assert _serve_sweep.is_in_transit("web.migrating-0a1b2c3d")
    assert _serve_sweep.is_in_transit(".web.migrating-0a1b2c3d.partial-ffff0000")
    for name in KEPT:
        assert not _serve_sweep.is_in_transit(name), name
