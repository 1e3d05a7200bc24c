"""Images as a trust boundary (issue 11): crafted manifests and image directories are refused,
naming what is wrong, in bounded time, and nothing outside the image is read or written."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from torpor._errors import (
    ImageCorruptedError,
    ImageError,
    SignatureError,
    UnsafeImageError,
    UnsafePathError,
)
from torpor._identity import host_identity
from torpor._images import _manifest
from torpor._images._image import GrowingHasher, Image, Staging, staging, write_manifest
from torpor._images._manifest import FileEntry, Manifest

PAGES = os.urandom(3 * 4096)
CRIU_FILES = {
    "inventory.img": b"inventory",
    "pstree.img": b"pstree",
    "core-1.img": b"core" * 100,
    "pages-1.img": PAGES,
}
SHA = "a" * 64
KINDS = {"symlink": "symlink", "fifo": "FIFO", "directory": "directory"}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private TORPOR_HOME: the host key that signs images is made there."""
    home = tmp_path / "home"
    monkeypatch.setenv("TORPOR_HOME", str(home))
    return home


def build(files: list[FileEntry], name: str = "img") -> Manifest:
    return _manifest.build(
        name=name, pid=42, files=files, criu_version="4.2.1", cmdline=["app"], rss_bytes=1
    )


def make(
    root: Path,
    name: str = "img",
    files: dict[str, bytes] | None = None,
    *,
    sign: bool = True,
    before_commit: Callable[[Path], None] | None = None,
) -> Image:
    """A committed image shaped like CRIU's (the files every image has, a pages file)."""
    with staging(root / name) as st:
        for fname, data in (CRIU_FILES if files is None else files).items():
            (st.path / fname).write_bytes(data)
        if before_commit is not None:
            before_commit(st.path)
        return st.commit(lambda entries: build(entries, name), sign=sign)


def manifest_doc(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = json.loads(build([FileEntry("pstree.img", 1, SHA)]).to_json())
    doc.update(changes)
    return doc


def rewrite_manifest(image_dir: Path, doc: dict[str, object]) -> None:
    """Replace torpor.json's bytes, leaving torpor.sig as it is (what an attacker would do)."""
    (image_dir / "torpor.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


# --- manifests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../x", "/x", "/etc/shadow", "", ".", "..", "a/b", "a\\b", "x" * 256, "a\nb"]
)
def test_a_file_name_that_is_not_plain_is_refused_naming_it(name: str) -> None:
    doc = manifest_doc(files=[{"name": name, "size": 1, "sha256": SHA}])
    with pytest.raises(UnsafeImageError) as info:
        Manifest.from_json(json.dumps(doc), source="m.json")
    assert info.value.file == name
    assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"files": [{"name": "x", "size": -1, "sha256": SHA}]}, "file x has size -1"),
        ({"files": [{"name": "x", "size": "1", "sha256": SHA}]}, "file x has size '1'"),
        ({"files": [{"name": "x", "size": True, "sha256": SHA}]}, "file x has size True"),
        ({"files": [{"name": "x", "size": 1, "sha256": "00"}]}, "not 64 hex digits"),
        ({"files": [{"name": "x", "size": 1, "sha256": "A" * 64}]}, "not 64 hex digits"),
        ({"files": [{"name": "x", "size": 1}]}, "not {name, size, sha256}"),
        ({"files": [{"name": "x", "size": 1, "sha256": SHA, "mode": 1}]}, "not {name, size"),
        ({"files": {"name": "x"}}, "files is not a list"),
        ({"id": "../../x"}, "is not 32 hex digits"),
        ({"pid": -1}, "pid -1 is not a non-negative integer"),
        ({"pid": 1 << 40}, "out of range"),
        ({"rss_bytes": 1.5}, "rss_bytes 1.5"),
        ({"labels": ["a"]}, "labels is not an object of strings"),
        ({"labels": {"a": 1}}, "labels is not an object of strings"),
        ({"cmdline": "rm -rf /"}, "cmdline is not a list of strings"),
        ({"shell_job": "yes"}, "shell_job is not true or false"),
        ({"format": "1"}, "is not a version number"),
        ({"host": None}, "host is not a string"),
        ({"surprise": 1}, "unknown field 'surprise'"),
    ],
)
def test_a_malformed_field_is_an_image_error(change: dict[str, object], what: str) -> None:
    with pytest.raises(ImageError) as info:
        Manifest.from_json(json.dumps(manifest_doc(**change)), source="m.json")
    assert str(info.value).startswith("m.json: malformed manifest (")
    assert what in str(info.value)


def test_an_image_name_that_is_a_path_is_refused() -> None:
    with pytest.raises(UnsafeImageError, match=r"image name '\.\./x'"):
        Manifest.from_json(json.dumps(manifest_doc(name="../x")))


@pytest.mark.parametrize("name", ["torpor.json", "torpor.sig", ".torpor-verified.json"])
def test_listing_a_bookkeeping_file_is_refused(name: str) -> None:
    doc = manifest_doc(files=[{"name": name, "size": 1, "sha256": SHA}])
    with pytest.raises(UnsafeImageError, match="torpor's own file") as info:
        Manifest.from_json(json.dumps(doc))
    assert info.value.file == name


def test_a_file_listed_twice_is_refused() -> None:
    entry = {"name": "pages-1.img", "size": 1, "sha256": SHA}
    with pytest.raises(UnsafeImageError, match="twice") as info:
        Manifest.from_json(json.dumps(manifest_doc(files=[entry, entry])))
    assert info.value.file == "pages-1.img"


@pytest.mark.parametrize("text", ["[" * 100_000, "1" * 5000, "\xff", "null", "[]"])
def test_text_that_is_no_manifest_is_an_image_error(text: str) -> None:
    with pytest.raises(ImageError, match="malformed manifest"):
        Manifest.from_json(text)


# --- the image directory -----------------------------------------------------------------------


def test_a_good_image_verifies(tmp_path: Path) -> None:
    image = make(tmp_path)
    again = Image.open(image.path)
    assert again.manifest == image.manifest
    again.check()
    again.verify(full=True)
    assert again.trusted()


def test_a_symlinked_image_directory_is_refused(tmp_path: Path) -> None:
    image = make(tmp_path)
    (tmp_path / "link").symlink_to(image.path)
    with pytest.raises(UnsafePathError, match="symlink"):
        Image.open(tmp_path / "link")


@pytest.mark.parametrize("mode", [0o777, 0o720, 0o702])
def test_an_image_directory_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    image = make(tmp_path)
    os.chmod(image.path, mode)
    with pytest.raises(UnsafePathError) as info:
        Image.open(image.path)
    assert info.value.path == str(image.path)
    assert info.value.hint == f"chmod go-w {image.path}"
    os.chmod(image.path, 0o700)
    opened = Image.open(image.path)
    os.chmod(image.path, mode)  # changed after it was opened: refused at use too
    with pytest.raises(UnsafePathError):
        opened.verify()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_an_image_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    image = make(tmp_path)
    os.chown(image.path, 65534, 65534)
    with pytest.raises(UnsafePathError, match="owned by uid 65534"):
        Image.open(image.path)


def test_a_symlinked_manifest_is_refused(tmp_path: Path) -> None:
    image = make(tmp_path)
    real = tmp_path / "elsewhere.json"
    (image.path / "torpor.json").rename(real)
    (image.path / "torpor.json").symlink_to(real)
    with pytest.raises(UnsafeImageError, match=r"torpor\.json is a symlink"):
        Image.open(image.path)


def test_a_fifo_manifest_is_refused_without_hanging(tmp_path: Path) -> None:
    image = make(tmp_path)
    (image.path / "torpor.json").unlink()
    os.mkfifo(image.path / "torpor.json")
    t0 = time.monotonic()
    with pytest.raises(UnsafeImageError, match=r"torpor\.json is a FIFO"):
        Image.open(image.path)
    assert time.monotonic() - t0 < 2


def test_an_image_directory_replaced_after_opening_is_refused(tmp_path: Path) -> None:
    image = make(tmp_path)
    opened = Image.open(image.path)
    image.path.rename(tmp_path / "moved")
    make(tmp_path, "other")
    (tmp_path / "other").rename(image.path)
    with pytest.raises(UnsafeImageError, match="was replaced since it was opened"):
        opened.verify()


@pytest.mark.parametrize("how", ["open", "check", "trusted", "verify", "verify-full"])
def test_a_file_the_manifest_does_not_list_is_refused_naming_it(tmp_path: Path, how: str) -> None:
    image = make(tmp_path)  # opened (by the commit) before the file appears
    (image.path / "pages-2.img").write_bytes(b"unverified pages")
    call: Callable[[], object] = {
        "open": lambda: Image.open(image.path),
        "check": image.check,
        "trusted": image.trusted,
        "verify": image.verify,
        "verify-full": lambda: image.verify(full=True),
    }[how]
    with pytest.raises(UnsafeImageError) as info:
        call()
    assert info.value.file == "pages-2.img"
    assert "pages-2.img not in its manifest" in str(info.value)


def test_an_extra_directory_is_refused(tmp_path: Path) -> None:
    image = make(tmp_path)
    (image.path / "parent").mkdir()
    with pytest.raises(UnsafeImageError, match="parent not in its manifest"):
        Image.open(image.path).verify()


def test_missing_and_extra_files_are_all_named(tmp_path: Path) -> None:
    image = make(tmp_path)
    (image.path / "core-1.img").unlink()
    (image.path / "core-2.img").write_bytes(b"x")
    with pytest.raises(UnsafeImageError) as info:
        Image.open(image.path).verify()
    assert info.value.file == "core-1.img"
    assert (
        str(info.value)
        .split(": ", 1)[1]
        .startswith("core-1.img missing; core-2.img not in its manifest")
    )


def test_the_bookkeeping_files_are_allowed(tmp_path: Path) -> None:
    image = make(tmp_path)
    (image.path / "criu-dump.log").write_text("log")
    (image.path / ".torpor-tmp-123-abcd").write_text("left by a crash")
    assert {p.name for p in image.path.iterdir()} == {
        *CRIU_FILES,
        "torpor.json",
        "torpor.sig",
        ".torpor-verified.json",
        "criu-dump.log",
        ".torpor-tmp-123-abcd",
    }
    Image.open(image.path).verify(full=True)


@pytest.mark.parametrize("missing", ["inventory.img", "pstree.img"])
def test_a_manifest_that_omits_what_every_criu_image_has_is_refused(
    tmp_path: Path, missing: str
) -> None:
    files = {k: v for k, v in CRIU_FILES.items() if k != missing}
    image = make(tmp_path, files=files)
    with pytest.raises(UnsafeImageError, match=f"does not list {missing}") as info:
        image.check()
    assert info.value.file == missing


def test_an_empty_file_list_is_refused(tmp_path: Path) -> None:
    image = make(tmp_path)
    write_manifest(image.path, image.manifest.evolve(files=()))
    with pytest.raises(UnsafeImageError, match=r"does not list inventory\.img"):
        Image.open(image.path).verify()


def test_a_symlink_to_dev_zero_is_refused_at_once(tmp_path: Path) -> None:
    image = make(tmp_path)
    (image.path / "pages-1.img").unlink()
    (image.path / "pages-1.img").symlink_to("/dev/zero")
    t0 = time.monotonic()
    for call in (image.check, image.trusted, lambda: image.verify(full=True)):
        with pytest.raises(UnsafeImageError, match=r"pages-1\.img is a symlink") as info:
            call()
        assert info.value.file == "pages-1.img"
    assert time.monotonic() - t0 < 2


def test_a_symlink_outside_is_not_followed_and_its_size_not_told(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 12345)
    image = make(tmp_path, files={**CRIU_FILES, "core-1.img": b"s" * 12345})
    (image.path / "core-1.img").unlink()
    (image.path / "core-1.img").symlink_to(secret)
    with pytest.raises(UnsafeImageError) as info:
        Image.open(image.path).verify(full=True)
    assert (
        str(info.value)
        .split(" — ")[0]
        .endswith("file core-1.img is a symlink, not a regular file; refused")
    )
    assert "12345" not in str(info.value)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_listed_file_that_is_not_regular_is_refused(tmp_path: Path, kind: str) -> None:
    image = make(tmp_path)
    target = image.path / "pages-1.img"
    target.unlink()
    os.mkfifo(target) if kind == "fifo" else target.mkdir()
    t0 = time.monotonic()
    with pytest.raises(UnsafeImageError, match=f"pages-1.img is a {KINDS[kind]}"):
        image.verify(full=True)
    assert time.monotonic() - t0 < 2


def test_a_listed_file_writable_by_others_is_refused(tmp_path: Path) -> None:
    image = make(tmp_path)
    os.chmod(image.path / "pages-1.img", 0o666)
    with pytest.raises(UnsafeImageError, match=r"pages-1.img is writable by group or others"):
        image.trusted()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file away")
def test_a_listed_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    image = make(tmp_path)
    os.chown(image.path / "core-1.img", 65534, 65534)
    with pytest.raises(UnsafeImageError, match=r"core-1.img is owned by uid 65534"):
        image.check()


def test_open_file_reads_only_listed_regular_files(tmp_path: Path) -> None:
    image = make(tmp_path)
    with image.open_file("pages-1.img") as fh:
        assert fh.read() == PAGES
    with pytest.raises(UnsafeImageError, match=r"no file 'torpor\.sig' in its manifest"):
        image.open_file("torpor.sig")
    (image.path / "pages-1.img").unlink()
    (image.path / "pages-1.img").symlink_to("/dev/zero")
    with pytest.raises(UnsafeImageError, match="is a symlink"):
        image.open_file("pages-1.img")


# --- staging -----------------------------------------------------------------------------------


def test_commit_makes_every_file_private(tmp_path: Path) -> None:
    def criu_like(staged: Path) -> None:
        for f in staged.iterdir():
            os.chmod(f, 0o644)  # as CRIU writes them

    image = make(tmp_path, before_commit=criu_like)
    modes = {p.name: p.stat().st_mode & 0o777 for p in image.path.iterdir()}
    assert set(modes.values()) == {0o600}
    assert image.path.stat().st_mode & 0o777 == 0o700
    image.verify()


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_commit_refuses_a_staged_entry_that_is_not_a_regular_file(
    tmp_path: Path, kind: str
) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"root's file")

    def plant(staged: Path) -> None:
        p = staged / "pages-2.img"
        if kind == "symlink":
            p.symlink_to(outside)
        elif kind == "fifo":
            os.mkfifo(p)
        else:
            p.mkdir()

    with pytest.raises(UnsafeImageError, match=f"holds pages-2.img, a {KINDS[kind]}") as info:
        make(tmp_path, before_commit=plant)
    assert info.value.file == "pages-2.img"
    assert outside.read_bytes() == b"root's file"
    assert not (tmp_path / "img").exists()


@pytest.mark.parametrize("name", ["torpor.json", ".torpor-verified.json", "torpor.sig"])
def test_commit_never_writes_through_a_planted_symlink(tmp_path: Path, name: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file")
    victim.chmod(0o644)

    def plant(staged: Path) -> None:
        (staged / name).symlink_to(victim)

    image = make(tmp_path, before_commit=plant)
    assert victim.read_bytes() == b"root's file"
    assert victim.stat().st_mode & 0o777 == 0o644
    assert not (image.path / name).is_symlink()
    Image.open(image.path).verify()


def test_commit_refuses_a_manifest_that_does_not_list_what_was_staged(tmp_path: Path) -> None:
    with (
        pytest.raises(ImageCorruptedError, match="does not list the staged files"),
        staging(tmp_path / "img") as st,
    ):
        for fname, data in CRIU_FILES.items():
            (st.path / fname).write_bytes(data)
        st.commit(lambda entries: build([e for e in entries if e.name != "pages-1.img"]))


def test_growing_hasher_never_follows_a_symlink_nor_opens_a_fifo(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    d = tmp_path / "staged"
    d.mkdir()
    (d / "pages-1.img").write_bytes(b"p" * 100)
    (d / "pages-2.img").symlink_to(outside)
    os.mkfifo(d / "pages-3.img")
    t0 = time.monotonic()
    with GrowingHasher(d) as hasher:
        entries = hasher.entries()
    assert time.monotonic() - t0 < 2
    assert set(entries) == {"pages-1.img"}


# --- signatures --------------------------------------------------------------------------------


def test_commit_signs_with_this_hosts_key(tmp_path: Path) -> None:
    image = make(tmp_path)
    key = host_identity().key_id
    assert image.signer == key
    sig = image.path / "torpor.sig"
    assert sig.stat().st_mode & 0o777 == 0o600
    assert set(json.loads(sig.read_text())) == {"key", "sig"}
    again = Image.open(image.path)
    assert (again.signer, again.signed_by) == (key, key)


def test_a_manifest_changed_after_signing_is_refused(tmp_path: Path) -> None:
    image = make(tmp_path)
    # Flip a page and rewrite the manifest's hash to match: only the signature catches it.
    flipped = bytearray(PAGES)
    flipped[100] ^= 1
    (image.path / "pages-1.img").write_bytes(bytes(flipped))
    doc = json.loads(image.manifest.to_json())
    for f in doc["files"]:
        if f["name"] == "pages-1.img":
            import hashlib

            f["sha256"] = hashlib.sha256(bytes(flipped)).hexdigest()
    rewrite_manifest(image.path, doc)
    with pytest.raises(SignatureError, match="does not match its manifest"):
        Image.open(image.path)


def test_an_unsigned_image_is_accepted_as_unsigned(tmp_path: Path) -> None:
    image = make(tmp_path, sign=False)
    assert image.signer is None
    assert not (image.path / "torpor.sig").exists()
    again = Image.open(image.path)
    assert again.signer is None
    again.verify(full=True)


def test_an_unsigned_commit_removes_a_planted_signature(tmp_path: Path) -> None:
    def plant(staged: Path) -> None:
        (staged / "torpor.sig").write_text('{"key": "x", "sig": "y"}')

    image = make(tmp_path, sign=False, before_commit=plant)
    assert not (image.path / "torpor.sig").exists()
    assert Image.open(image.path).signer is None


@pytest.mark.parametrize(
    "forge",
    [
        lambda key, sig: b"not json",
        lambda key, sig: b"[]",
        lambda key, sig: b'{"key": "ab", "sig": "cd"}',
        lambda key, sig: json.dumps({"key": key, "sig": sig, "extra": 1}).encode(),
        lambda key, sig: json.dumps({"key": key, "sig": "0" * 128}).encode(),
        lambda key, sig: json.dumps({"key": key, "sig": sig.upper()}).encode(),
        lambda key, sig: json.dumps({"key": key, "sig": sig[:-2]}).encode(),
        lambda key, sig: json.dumps({"key": key.upper(), "sig": sig}).encode(),
        lambda key, sig: json.dumps({"key": key, "sig": int(sig, 16)}).encode(),
    ],
    ids=["text", "list", "short", "extra", "zeros", "upper-sig", "cut", "upper-key", "number"],
)
def test_a_malformed_or_wrong_signature_is_refused(
    tmp_path: Path, forge: Callable[[str, str], bytes]
) -> None:
    image = make(tmp_path)
    good = json.loads((image.path / "torpor.sig").read_text())
    (image.path / "torpor.sig").write_bytes(forge(good["key"], good["sig"]))
    with pytest.raises(SignatureError):
        Image.open(image.path)


def test_a_signature_of_another_manifest_is_refused(tmp_path: Path) -> None:
    a = make(tmp_path, "a")
    b = make(tmp_path, "b")
    (b.path / "torpor.sig").write_bytes((a.path / "torpor.sig").read_bytes())
    with pytest.raises(SignatureError, match=f"signed by key {a.signer}"):
        Image.open(b.path)


def test_a_symlinked_signature_is_refused(tmp_path: Path) -> None:
    image = make(tmp_path)
    real = tmp_path / "sig"
    (image.path / "torpor.sig").rename(real)
    (image.path / "torpor.sig").symlink_to(real)
    with pytest.raises(UnsafeImageError, match=r"torpor\.sig is a symlink"):
        Image.open(image.path)


def test_an_unusable_host_key_leaves_the_image_unsigned(tmp_path: Path, home: Path) -> None:
    home.mkdir(mode=0o700)
    (home / "identity").symlink_to(tmp_path)  # refused by the identity code
    image = make(tmp_path)
    assert image.signer is None
    Image.open(image.path).verify()


def test_rewriting_the_manifest_drops_its_signature(tmp_path: Path) -> None:
    image = make(tmp_path)
    write_manifest(image.path, image.manifest.evolve(name="renamed"))
    again = Image.open(image.path)
    assert (again.name, again.signer) == ("renamed", None)


def test_staging_is_a_private_directory(tmp_path: Path) -> None:
    st = Staging(tmp_path / "img")
    st.create()
    assert st.path.stat().st_mode & 0o777 == 0o700
    st.discard()
