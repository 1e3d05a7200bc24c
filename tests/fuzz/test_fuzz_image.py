"""Fuzzing image directories, the way root meets them: a manifest (valid, short, padded with
hostile names, or garbage) beside files that may be symlinks (to ``/dev/zero``, to root-only
files, out of the image), FIFOs, devices, directories, hard links to files elsewhere, in a
directory that may be writable by others or owned by another user.

Every command that reads an image (``verify``, ``torpor inspect``, ``torpor images``,
``torpor image push``) ends with success or a :class:`~torpor.TorporError`, in bounded time,
writing nothing outside the home. An image that verifies (or is pushed) is a clean one: a
private directory holding exactly the regular, plain-named files its manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

import torpor._cli._image
import torpor._cli._images
import torpor._cli._inspect
import torpor._images._inspect  # noqa: F401 - imported once here, not in every child
from torpor._cli import main
from torpor._images._image import Image
from torpor._safe import is_plain_name

from .support import HOSTILE_NAMES, OUT, Jail, in_child, mutated_json, scaled
from .test_fuzz_manifest import VALID

BOOKKEEPING = {"torpor.json", "torpor.sig", ".torpor-verified.json", "criu-dump.log"}
FOREIGN_UID = 4321
ROOT = os.geteuid() == 0  # torpor's case; without root, no devices or foreign owners are made
SECRET = Path("/etc/shadow")


def _fs_name(name: str) -> bool:
    # A name we can create on disk (the kernel's rules), the manifest's name excepted.
    try:
        encoded = os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return (
        name not in ("", ".", "..", "torpor.json")
        and b"/" not in encoded
        and b"\0" not in encoded
        and len(encoded) <= 255
    )


DISK_NAMES = st.one_of(
    st.sampled_from(
        [
            "pages-1.img",
            "core-1.img",
            "mm-1.img",
            "pstree.img",
            "inventory.img",
            "stats-dump",
            "criu-dump.log",
            "x.log",
            ".hidden",
            ".torpor-verified.json",
            ".torpor-tmp-1",
            "torpor.sig",
        ]
    ),
    st.text(min_size=1, max_size=12),
).filter(_fs_name)

LINK_TARGETS = st.sampled_from(
    [
        "/dev/zero",
        "/dev/urandom",
        str(SECRET),
        f"{OUT}/sentinel",
        OUT,
        "..",
        "../../../..",
        "pages-1.img",
        "/nonexistent",
        "/proc/self/mem",
    ]
)


@st.composite
def entries(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(
        st.sampled_from(["file", "file", "file", "symlink", "fifo", "device", "dir", "hardlink"])
    )
    entry: dict[str, Any] = {"kind": kind, "listed": draw(st.booleans() | st.just(True))}
    if kind == "file":
        entry["data"] = draw(st.binary(max_size=64))
    elif kind == "symlink":
        entry["target"] = draw(LINK_TARGETS)
    entry["truthful"] = draw(st.booleans() | st.just(True))  # listed with its real size/hash
    return entry


REQUIRED = {
    "inventory.img": {"kind": "file", "listed": True, "truthful": True, "data": b"inv"},
    "pstree.img": {"kind": "file", "listed": True, "truthful": True, "data": b"tree"},
}


@st.composite
def image_dirs(draw: st.DrawFn) -> dict[str, Any]:
    # Mostly an image with the files every CRIU image has (else it is refused before anything
    # else is looked at), with hostile entries beside or instead of them.
    base = draw(st.sampled_from([REQUIRED, REQUIRED, REQUIRED, {}]))
    files = {**base, **draw(st.dictionaries(DISK_NAMES, entries(), max_size=5))}
    return {
        "files": files,
        "extra_listed": draw(st.lists(HOSTILE_NAMES, max_size=2)),
        "mode": draw(st.sampled_from([0o700, 0o700, 0o700, 0o755, 0o777, 0o720])),
        "foreign": draw(st.sampled_from([False, False, True])),
        "garbage": draw(st.none() | st.none() | st.none() | mutated_json(VALID)),
    }


def _content(jail: Jail, d: Path, name: str, entry: dict[str, Any]) -> bytes:
    """What reading the entry (following links) gives, for a truthful manifest; b"" for
    anything that is not a readable regular file in the end."""
    kind = entry["kind"]
    if kind == "file":
        data: bytes = entry["data"]
        return data
    if kind == "hardlink":
        return (jail.outside / "sentinel").read_bytes()
    if kind == "symlink":
        target = d / jail.fill(entry["target"])
        try:
            if target.is_file():
                return target.read_bytes()
        except OSError:
            pass
    return b""


def build(jail: Jail, spec: dict[str, Any]) -> Path:
    """The image directory ``spec`` describes, as ``<home>/images/fuzz``."""
    d = jail.home / "images" / "fuzz"
    d.mkdir(parents=True, mode=0o700)
    listed: list[dict[str, Any]] = []
    for name, entry in spec["files"].items():
        p = d / name
        kind = entry["kind"]
        if kind == "file":
            p.write_bytes(entry["data"])
        elif kind == "symlink":
            p.symlink_to(jail.fill(entry["target"]))
        elif kind == "fifo":
            os.mkfifo(p, 0o600)
        elif kind == "device" and ROOT:
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
        elif kind == "device":
            os.mkfifo(p, 0o600)  # only root makes devices: the nearest hostile kind
        elif kind == "dir":
            p.mkdir()
        else:
            os.link(jail.outside / "sentinel", p)
        if entry["listed"]:
            data = _content(jail, d, name, entry) if entry["truthful"] else b"lie"
            listed.append(
                {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
    for name in spec["extra_listed"]:
        listed.append({"name": jail.fill(name), "size": 0, "sha256": hashlib.sha256().hexdigest()})
    doc = spec["garbage"] if spec["garbage"] is not None else {**VALID, "files": listed}
    (d / "torpor.json").write_text(json.dumps(jail.fill(doc)))
    if spec["foreign"] and ROOT:
        os.chown(d, FOREIGN_UID, FOREIGN_UID)
    os.chmod(d, spec["mode"])
    return d


def assert_clean(d: Path) -> None:
    """What an image that passed must be: private, exactly its listed regular plain files."""
    st_ = os.lstat(d)
    assert stat.S_ISDIR(st_.st_mode) and st_.st_uid in (0, os.geteuid()), "foreign image dir"
    assert not st_.st_mode & 0o022, f"image dir mode {stat.S_IMODE(st_.st_mode):o} accepted"
    manifest = json.loads((d / "torpor.json").read_text())
    names = [f["name"] for f in manifest["files"]]
    assert all(is_plain_name(n) for n in names), f"unsafe names accepted: {names}"
    for n in names:
        mode = os.lstat(d / n).st_mode
        assert stat.S_ISREG(mode), f"{n} is not a regular file ({stat.filemode(mode)}), accepted"
    on_disk = {n for n in os.listdir(d) if n not in BOOKKEEPING and not n.startswith(".torpor-")}
    assert on_disk == set(names), f"files not as listed accepted: {on_disk ^ set(names)}"


def _cli(*argv: str) -> None:
    os.environ["TORPOR_DEBUG"] = "1"  # in the child: an unexpected error raises, not exit 70
    code = main(list(argv))
    assert code in (0, 1), f"torpor {' '.join(argv)} exited {code}"
    if code == 1:
        raise _Refused


class _Refused(Exception):
    """The command printed a TorporError and exited 1."""


@scaled(0.5)
@given(image_dirs())
def test_verify(spec: dict[str, Any]) -> None:
    with Jail() as jail:
        d = build(jail, spec)

        def verify() -> None:
            Image.open(d).verify(full=True)
            assert_clean(d)

        in_child(verify, seconds=3)


@scaled(0.5)
@given(image_dirs())
def test_inspect_and_list(spec: dict[str, Any]) -> None:
    with Jail() as jail:
        d = build(jail, spec)
        in_child(lambda: _cli("inspect", str(d), "--json"), also=(_Refused,), seconds=3)
        in_child(lambda: _cli("images", "--json"), also=(_Refused,), seconds=3)


@scaled(0.5)
@given(image_dirs())
def test_push(spec: dict[str, Any]) -> None:
    with Jail() as jail:
        d = build(jail, spec)

        def push() -> None:
            _cli("image", "push", str(d), "pushed")
            assert_clean(d)

        in_child(push, also=(_Refused,), seconds=3)
