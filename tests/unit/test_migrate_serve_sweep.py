"""The startup sweep of a migration server (``torpor._migrate._serve_sweep._sweep``) in a
real home: it removes the received images and staging directories a killed server recorded
in the home's journal before making them, and nothing else of the images directory: a user's
image named exactly as the server names its own stays, and a symlink planted under a recorded
name leads the sweep nowhere. nftables is a fake here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from torpor._errors import AlreadyExistsError
from torpor._images import _manifest
from torpor._images._image import Image, Staging, staging
from torpor._migrate import _netlock, _serve, _serve_sweep
from torpor._migrate._channel import ChannelError
from torpor._process._proc import start_time


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
# A user's images named exactly as the server names its own: no server recorded them.
AS_IF_IN_TRANSIT = ["db.migrating-0a1b2c3d", "app.v2.migrating-deadbeef"]


def _left_alone(images: Path, name: str) -> str:
    return (
        f"left {images / name} alone: named like an image in transit, but no migration of "
        "this home recorded it (remove it by hand if it is a leftover)"
    )


def _removed(images: Path, name: str) -> str:
    return f"removed {images / name}, left by a migration that did not finish"


def _transit_journal(images: Path) -> Path:
    return images.parent / "migrate-transit.json"


def test_a_user_s_images_named_like_ones_in_transit_survive_the_sweep(images: Path) -> None:
    for name in KEPT + AS_IF_IN_TRANSIT[:1]:
        make_image(images, name)  # sealed images
    (images / AS_IF_IN_TRANSIT[1]).mkdir(mode=0o700)  # and a directory, no image
    (images / AS_IF_IN_TRANSIT[1] / "notes").write_bytes(b"mine")
    half = Staging(images / "web.migrating-0a1b2c3e")  # a staging-like one of a user's
    half.create()
    logged: list[str] = []
    _serve_sweep._sweep(logged.append)
    assert sorted(p.name for p in images.iterdir()) == sorted(
        [*KEPT, *AS_IF_IN_TRANSIT, half.path.name]
    )
    for name in [*KEPT, AS_IF_IN_TRANSIT[0]]:
        Image.open(images / name)  # whole, still
    assert (images / AS_IF_IN_TRANSIT[1] / "notes").read_bytes() == b"mine"
    assert logged == [_left_alone(images, n) for n in sorted([half.path.name, *AS_IF_IN_TRANSIT])]


@pytest.mark.parametrize("when", ["half-received", "sealed"])
def test_what_the_server_recorded_is_removed(images: Path, when: str) -> None:
    make_image(images, AS_IF_IN_TRANSIT[0])  # a user's, alongside
    st_ = Staging(_serve_sweep.in_transit("db"))
    _serve_sweep.record_transit(st_)
    if when == "half-received":
        st_.create()
        (st_.path / "pages-1.img").write_bytes(b"x")
        left = st_.path
    else:
        left = make_image(images, st_.dest.name).path
    # ... and the server is killed here: the next one's sweep.
    logged: list[str] = []
    _serve_sweep._sweep(logged.append)
    assert sorted(p.name for p in images.iterdir()) == [AS_IF_IN_TRANSIT[0]]
    assert sorted(logged) == sorted(
        [_left_alone(images, AS_IF_IN_TRANSIT[0]), _removed(images, left.name)]
    )
    assert not _transit_journal(images).exists()


def test_a_symlink_under_a_recorded_name_does_not_lead_the_sweep_elsewhere(
    images: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_bytes(b"keep")
    st_ = Staging(_serve_sweep.in_transit("db"))
    _serve_sweep.record_transit(st_)
    images.mkdir(exist_ok=True)
    # Planted in the server's place (by whoever could write the images directory).
    st_.path.symlink_to(elsewhere, target_is_directory=True)
    (images / st_.dest.name).write_bytes(b"a file")
    logged: list[str] = []
    _serve_sweep._sweep(logged.append)
    assert (elsewhere / "precious").read_bytes() == b"keep"
    assert st_.path.is_symlink() and (images / st_.dest.name).read_bytes() == b"a file"
    why = "not a directory (a symlink is never followed)"
    assert logged == [
        f"left {images / n} alone: {why}" for n in sorted([st_.path.name, st_.dest.name])
    ]


def test_a_name_in_use_is_never_recorded(images: Path) -> None:
    make_image(images, AS_IF_IN_TRANSIT[0])
    with pytest.raises(AlreadyExistsError):
        _serve_sweep.record_transit(Staging(images / AS_IF_IN_TRANSIT[0]))
    assert not _transit_journal(images).exists()


def test_a_live_server_s_images_in_transit_are_not_taken(images: Path) -> None:
    st_ = Staging(_serve_sweep.in_transit("db"))
    _serve_sweep.record_transit(st_)
    st_.create()
    parent = os.getppid()  # alive: as another server of this home, still receiving
    journal = json.loads(_transit_journal(images).read_bytes())
    journal["owner"] = [parent, start_time(parent)]
    _transit_journal(images).write_text(json.dumps(journal))
    logged: list[str] = []
    _serve_sweep._sweep(logged.append)
    assert st_.path.is_dir()
    assert logged == [
        "left the images in transit alone: the server that recorded them in "
        "migrate-transit.json runs"
    ]


@pytest.mark.parametrize(
    "journal",
    [b"", b"[]", b"{", json.dumps({"dirs": ["../../etc", "/tmp/x", 7, "web"]}).encode()],
)
def test_a_journal_naming_nothing_the_server_makes_removes_nothing(
    images: Path, journal: bytes
) -> None:
    make_image(images, "web")
    (images.parent / "migrate-transit.json").write_bytes(journal)
    logged: list[str] = []
    _serve_sweep._sweep(logged.append)
    assert [p.name for p in images.iterdir()] == ["web"]
    assert logged == []


class _CutConn:
    """A source that announces one file, then breaks while sending it; what the target's
    journal and images directory held at that moment."""

    peer = SimpleNamespace(name="a")

    def __init__(self, images: Path) -> None:
        self.images = images
        self.seen: tuple[list[str], list[str]] | None = None

    def recv(self) -> dict[str, Any]:
        facts = {"cmdline": ["app"], "rss_bytes": 1, "pid": 42}
        return {"type": "image", "files": [{"name": "pages-1.img", "size": 10}], "facts": facts}

    def _data_into(self, buf: Any) -> int:
        journal = json.loads(_transit_journal(self.images).read_bytes())
        self.seen = (sorted(journal["dirs"]), sorted(p.name for p in self.images.iterdir()))
        raise ChannelError("the source went away")

    def send(self, msg: dict[str, Any]) -> None:
        pass


def test_the_server_records_its_directories_before_making_them_and_forgets_them_after(
    images: Path,
) -> None:
    conn = _CutConn(images)
    inc = _serve._Incoming(conn, "b:7070", lambda line: None)  # type: ignore[arg-type]
    with pytest.raises(ChannelError, match="went away"), inc.receiving("db"):
        pass
    assert conn.seen is not None
    recorded, present = conn.seen
    assert len(recorded) == 2 and present == recorded[:1]  # the staging directory, recorded
    assert _serve_sweep.is_in_transit(recorded[0]) and _serve_sweep.is_in_transit(recorded[1])
    assert list(images.iterdir()) == []
    assert not _transit_journal(images).exists()


def test_in_transit_names_are_known_and_only_those() -> None:
    assert _serve_sweep.is_in_transit("web.migrating-0a1b2c3d")
    assert _serve_sweep.is_in_transit(".web.migrating-0a1b2c3d.partial-ffff0000")
    for name in KEPT:
        assert not _serve_sweep.is_in_transit(name), name
