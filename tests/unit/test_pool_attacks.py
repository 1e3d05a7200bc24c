"""Attacks on the pool boundary, as a shared pool, a crafted archive or another host would make
them: hostile names in pool manifests and archive members, planted symlinks and FIFOs, pools
and configurations another user could change, and images not signed by a trusted key.

Each attack must be refused with a one-line :class:`~torpor.TorporError` before anything is
fetched or written, and nothing may appear outside torpor's directories.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import zstandard

from torpor._errors import (
    ImageCorruptedError,
    PoolConfigError,
    PoolError,
    SignatureError,
    TorporError,
    UnsafeImageError,
    UnsafePathError,
)
from torpor._identity import host_identity
from torpor._images._image import Image
from torpor._pools import Pool, create_pool, open_pool, set_pool
from torpor._pools._backend import Backend
from torpor._pools._dir import DirBackend
from torpor._pools._record import image_key
from torpor._pools._sign import Policy

from .test_pool_support import FAST, random_pages
from .test_pool_support import make_image as _make_image

PWNED = "torpor-pwned"


def make_image(root: Path, name: str, seed: int = 1) -> Image:
    """A small image shaped like CRIU's (with the files every dump writes)."""
    return _make_image(root, name, bytes(random_pages(40, seed=seed)), extra={"pstree.img": b"p"})


class Guarded:
    """A backend wrapper that records every ``get`` and fails on the prefixes forbidden."""

    def __init__(self, inner: Backend, forbid: tuple[str, ...] = ()) -> None:
        self.inner = inner
        self.forbid = forbid
        self.got: list[str] = []

    def get(self, key: str, limit: int | None = None) -> bytes:
        self.got.append(key)
        if key.startswith(self.forbid):
            raise AssertionError(f"{key} was fetched")
        return self.inner.get(key, limit)

    def get_stream(self, key: str) -> BinaryIO:
        self.got.append(key)
        if key.startswith(self.forbid):
            raise AssertionError(f"{key} was fetched")
        return self.inner.get_stream(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# Under the same temporary root: the session's Ceph cluster (tests/cluster), whose monitor
# writes and compacts its store there while these tests run. Its directory is still listed.
_LIVE = re.compile(r"ceph\d+")


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (relative), symlinks not followed; inside the session's
    running Ceph cluster directory only the directory itself."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            live = [d for d in dirnames if _LIVE.fullmatch(d)]
            out.update(live)
            dirnames[:] = [d for d in dirnames if d not in live]
        for name in dirnames + filenames:
            out.add(str((Path(dirpath) / name).relative_to(root)))
    return out


@pytest.fixture
def world(torpor_home: Path, tmp_path: Path) -> Path:
    """Where a test makes its local images and pools (beside the home)."""
    assert torpor_home.parent == tmp_path.parent
    return tmp_path


def around() -> Path:
    """The directory holding the home, the test's pools and local images: every ``../`` chain
    the tests make from the home lands in it, where :func:`tree` sees it."""
    return Path(os.environ["TORPOR_HOME"]).parent


@pytest.fixture
def dir_pool(world: Path) -> Iterator[Pool]:
    pool = Pool("shared", DirBackend(world / "pool"), timing=FAST)
    yield pool
    pool.close()


def _doc(pool: Pool, name: str) -> dict[str, Any]:
    return json.loads(zstandard.ZstdDecompressor().decompress(pool.backend.get(image_key(name))))


def _put_doc(pool: Pool, name: str, doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    pool.backend.put(image_key(name), zstandard.ZstdCompressor().compress(raw))


def _rename_file(doc: dict[str, Any], old: str, new: str, *, manifest: bool = True) -> None:
    """Give a file a new name in the record and (unless not ``manifest``) its embedded
    manifest, as an attacker who writes the record would."""
    for f in doc["files"]:
        if f["name"] == old:
            f["name"] = new
    for f in doc["manifest"]["files"] if manifest else ():
        if f["name"] == old:
            f["name"] = new
    doc.pop("signature", None)


# -- crafted pool manifests -----------------------------------------------------------------


def _escape(torpor_home: Path) -> str:
    """A ``../`` chain from the pull's staging directory to ``around()/PWNED``."""
    staging = torpor_home / "cache" / "images" / ".staging"
    up = len(staging.relative_to(around()).parts)
    return "../" * up + PWNED


@pytest.mark.parametrize("in_manifest", [True, False], ids=["record+manifest", "record"])
@pytest.mark.parametrize(
    "bad_name",
    ["ESCAPE", "/tmp/" + PWNED, "", ".", "..", "a/b", "torpor.json", "torpor.sig", ".hidden"],
)
def test_pull_refuses_a_record_with_a_hostile_file_name(
    dir_pool: Pool, world: Path, torpor_home: Path, bad_name: str, in_manifest: bool
) -> None:
    if bad_name == "ESCAPE":
        bad_name = _escape(torpor_home)
    dir_pool.push(make_image(world / "local", "src"), "web")
    doc = _doc(dir_pool, "web")
    _rename_file(doc, "core-1.img", bad_name, manifest=in_manifest)
    _put_doc(dir_pool, "web", doc)
    before = tree(around())
    guarded = Guarded(dir_pool.backend, forbid=("packs/", "lists/", "index/"))
    with Pool("shared", guarded, timing=FAST) as pool, pytest.raises(UnsafeImageError) as info:  # type: ignore[arg-type]
        pool.pull("web")
    assert info.value.file == bad_name
    assert "\n" not in str(info.value)
    assert "refused" in str(info.value)
    assert tree(around()) == before
    assert not Path("/tmp", PWNED).exists()


@pytest.mark.parametrize("in_manifest", [True, False], ids=["record+manifest", "record"])
def test_pull_refuses_duplicate_file_names(dir_pool: Pool, world: Path, in_manifest: bool) -> None:
    dir_pool.push(make_image(world / "local", "src"), "web")
    doc = _doc(dir_pool, "web")
    doc["files"].append(dict(doc["files"][0]))
    if in_manifest:
        doc["manifest"]["files"].append(dict(doc["manifest"]["files"][0]))
    doc.pop("signature")
    _put_doc(dir_pool, "web", doc)
    before = tree(around())
    with pytest.raises(UnsafeImageError, match=r"core-1.img (is listed )?twice; refused"):
        dir_pool.pull("web")
    assert tree(around()) == before


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d["manifest"].update(id="../../" + PWNED), f"id '../../{PWNED}' is not"),
        (lambda d: d["manifest"].update(id="/tmp/" + PWNED), f"id '/tmp/{PWNED}' is not"),
        (lambda d: d.update(name="other"), "it names itself 'other'"),
        (lambda d: d["manifest"].update(name="other"), "its manifest names the image 'other'"),
        (lambda d: d["files"].pop(), "its files are not the ones its manifest lists"),
        (lambda d: d["manifest"]["files"].pop(), "its files are not the ones its manifest lists"),
        (lambda d: d["files"][0].update(size=-1), "is out of range"),
        (lambda d: d["files"][0].update(chunk_size=0), "is out of range"),
        (lambda d: d["files"][0].update(sha256="../x"), "is not a SHA-256"),
    ],
)
def test_pull_refuses_a_record_with_bad_ids_or_files(
    dir_pool: Pool, world: Path, change: Callable[[dict[str, Any]], None], why: str
) -> None:
    dir_pool.push(make_image(world / "local", "src"), "web")
    doc = _doc(dir_pool, "web")
    doc.pop("signature")
    change(doc)
    _put_doc(dir_pool, "web", doc)
    before = tree(around())
    guarded = Guarded(dir_pool.backend, forbid=("packs/", "lists/", "index/"))
    with Pool("shared", guarded, timing=FAST) as pool, pytest.raises(ImageCorruptedError) as info:  # type: ignore[arg-type]
        pool.pull("web")
    assert why in str(info.value)
    assert str(info.value).startswith("the manifest of image 'web' in pool 'shared' is damaged")
    assert tree(around()) == before


def test_a_list_id_that_is_a_path_never_names_a_cache_file(
    dir_pool: Pool, world: Path, torpor_home: Path
) -> None:
    # A file long enough to have its chunk list in a list object (not inline).
    big = _make_image(world / "local", "src", bytes(random_pages(100)), extra={"pstree.img": b"p"})
    dir_pool.push(big, "web")
    doc = _doc(dir_pool, "web")
    doc.pop("signature")
    (f,) = [f for f in doc["files"] if "list" in f]
    f["list"] = "../../../" + PWNED
    _put_doc(dir_pool, "web", doc)
    before = tree(around())
    with pytest.raises(ImageCorruptedError, match=r"is not an id torpor makes"):
        dir_pool.pull("web")
    assert tree(around()) == before


def test_an_index_key_that_is_not_an_id_is_ignored(
    dir_pool: Pool, world: Path, torpor_home: Path
) -> None:
    dir_pool.push(make_image(world / "local", "src"), "web")
    (real,) = dir_pool.backend.list("index/")
    # A valid index under a key of another form: never used, never a cache file name.
    dir_pool.backend.put("index/..." + PWNED, dir_pool.backend.get(real))
    image = dir_pool.pull("web")
    image.verify()
    assert [p for p in tree(around()) if PWNED in p] == [
        f"{world.name}/pool/index+/...{PWNED}"  # the planted key itself, nothing else
    ]


def test_an_image_name_that_is_a_path_is_refused(dir_pool: Pool) -> None:
    with pytest.raises(TorporError, match=r"invalid image name '\.\./x'"):
        dir_pool.pull("../x")


# -- planted files in a dir pool ------------------------------------------------------------


def test_a_symlink_planted_as_a_record_is_refused(dir_pool: Pool, world: Path) -> None:
    secret = world / "secret"
    secret.write_bytes(b"root only")
    link = Path(dir_pool.backend.root) / "images+" / "web"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(secret)
    with pytest.raises(PoolError, match=r"key 'images/web' in dir pool .* is a symlink; refused"):
        dir_pool.pull("web")


def test_a_fifo_planted_as_a_record_is_refused_without_hanging(dir_pool: Pool, world: Path) -> None:
    fifo = Path(dir_pool.backend.root) / "images+" / "web"
    fifo.parent.mkdir(mode=0o700)
    os.mkfifo(fifo, 0o600)

    def hang(signum: int, frame: object) -> None:
        raise AssertionError("pull hung on a FIFO")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(5)
    try:
        with pytest.raises(PoolError, match=r"is a FIFO, not a regular file; refused"):
            dir_pool.pull("web")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_push_refuses_a_symlink_in_the_local_image(dir_pool: Pool, world: Path) -> None:
    secret = world / "secret"
    secret.write_bytes(b"root only" * 100)
    image = make_image(world / "local", "src")
    victim = image.path / "core-1.img"
    size = victim.stat().st_size
    victim.unlink()
    # Same size as the listed file, so only the symlink check can catch it.
    secret.write_bytes(b"s" * size)
    victim.symlink_to(secret)
    # Bypass the local image's own checks (another helper's boundary): push must not follow.
    image = Image(image.path, image.manifest)
    with pytest.raises(UnsafeImageError, match=r"core-1.img is a symlink"):
        dir_pool.push(image, "web")
    assert list(dir_pool.backend.list("images/")) == []


# -- pool sources and configurations another user could change -------------------------------


def test_a_dir_pool_writable_by_others_is_refused(world: Path) -> None:
    root = world / "open"
    root.mkdir(mode=0o700)
    os.chmod(root, 0o777)
    with pytest.raises(UnsafePathError) as info:
        DirBackend(root)
    assert str(info.value) == (
        f"dir pool directory {root} is writable by others (mode 0777); refused — chmod go-w {root}"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_a_dir_pool_owned_by_another_user_is_refused(world: Path) -> None:
    root = world / "theirs"
    root.mkdir(mode=0o700)
    os.chown(root, 4321, 4321)
    with pytest.raises(UnsafePathError, match=r"is owned by uid 4321"):
        DirBackend(root)


def test_a_dir_pool_that_is_a_symlink_is_refused(world: Path) -> None:
    real = world / "real"
    real.mkdir(mode=0o700)
    (world / "link").symlink_to(real)
    with pytest.raises(UnsafePathError, match=r"is not a directory"):
        DirBackend(world / "link")


def test_a_pool_configuration_others_can_write_is_refused(world: Path) -> None:
    create_pool("p", "dir", {"source": str(world / "p")})
    conf = Path(os.environ["TORPOR_HOME"]) / "pools" / "p.json"
    open_pool("p").close()
    os.chmod(conf, 0o666)
    with pytest.raises(UnsafePathError) as info:
        open_pool("p")
    assert str(info.value) == (
        f"pool configuration {conf} is writable by group or others (mode 0666); refused"
        f" — chmod go-w {conf}"
    )


def test_a_pool_configuration_that_is_a_symlink_is_refused(world: Path) -> None:
    planted = world / "evil.json"
    planted.write_text(
        json.dumps({"name": "p", "driver": "dir", "config": {"source": "/"}, "created": ""})
    )
    os.chmod(planted, 0o600)
    conf = Path(os.environ["TORPOR_HOME"]) / "pools" / "p.json"
    conf.parent.mkdir(mode=0o700, exist_ok=True)
    conf.symlink_to(planted)
    with pytest.raises(UnsafePathError, match=r"pool configuration .*p\.json is a symlink"):
        open_pool("p")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_a_pool_configuration_owned_by_another_user_is_refused(world: Path) -> None:
    create_pool("p", "dir", {"source": str(world / "p")})
    conf = Path(os.environ["TORPOR_HOME"]) / "pools" / "p.json"
    os.chown(conf, 4321, 4321)
    with pytest.raises(UnsafePathError, match=r"is owned by uid 4321, not by root; refused"):
        open_pool("p")


# -- crafted archives -----------------------------------------------------------------------


def _export(pool: Pool, world: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    pool.push(make_image(world / "local", "src"), "web")
    buf = io.BytesIO()
    pool.export_image("web", buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def _archive(members: list[tuple[tarfile.TarInfo, bytes]]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buf.seek(0)
    return buf


def _member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE) -> tuple[Any, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "/etc/shadow"
    return info, data


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (_member("../" + PWNED), "is not a name an export writes"),
        (_member("/tmp/" + PWNED), "is not a name an export writes"),
        (_member("packs/../../" + PWNED), "is not a name an export writes"),
        (_member("images/../" + PWNED), "is not a name an export writes"),
        (_member("sessions/x"), "is not a name an export writes"),
        (_member("packs/00/" + "ab" * 16), "is not a name an export writes"),
        (_member("lists/" + PWNED), "is not a name an export writes"),
        (_member("images/x", kind=tarfile.SYMTYPE), "is a symlink, not a regular file"),
        (_member("images/x", kind=tarfile.LNKTYPE), "is a hard link, not a regular file"),
        (_member("images/x", kind=tarfile.CHRTYPE), "is a device or FIFO, not a regular file"),
        (_member("images/x", kind=tarfile.FIFOTYPE), "is a device or FIFO, not a regular file"),
        (_member("images", kind=tarfile.DIRTYPE), "is a directory, not a regular file"),
        (_member("torpor-pool.json"), "is in the archive twice"),
    ],
)
def test_import_refuses_a_crafted_archive(
    dir_pool: Pool, world: Path, extra: tuple[tarfile.TarInfo, bytes], why: str
) -> None:
    members = _export(dir_pool, world)
    members.insert(1, extra)
    archive = _archive(members)
    before = tree(around())
    with pytest.raises(UnsafeImageError) as info:
        dir_pool.import_image(archive, "imported")
    assert why in str(info.value)
    assert str(info.value).startswith("archive ")
    assert "\n" not in str(info.value)
    assert tree(around()) == before
    assert list(dir_pool.backend.list("images/")) == ["images/web"]


def test_import_refuses_an_archive_whose_record_has_an_escaping_file_name(
    dir_pool: Pool, world: Path, torpor_home: Path
) -> None:
    members = _export(dir_pool, world)
    info, blob = members[-1]
    assert info.name == "images/web"
    doc = json.loads(zstandard.ZstdDecompressor().decompress(blob))
    _rename_file(doc, "core-1.img", _escape(torpor_home))
    blob = zstandard.ZstdCompressor().compress(json.dumps(doc).encode())
    info.size = len(blob)
    members[-1] = (info, blob)
    before = tree(around())
    with pytest.raises(UnsafeImageError, match=r"is a path, not a plain name; refused"):
        dir_pool.import_image(_archive(members), "imported")
    assert tree(around()) == before
    assert list(dir_pool.backend.list("images/")) == ["images/web"]


# -- signatures -----------------------------------------------------------------------------


@pytest.fixture
def other_host(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], str]]:
    """Switch to another torpor home (another host identity) and back."""
    homes: dict[str, str] = {"here": os.environ["TORPOR_HOME"]}
    there = tmp_path_factory.mktemp("other-host")

    def switch(where: str) -> str:
        monkeypatch.setenv("TORPOR_HOME", homes["here"] if where == "here" else str(there))
        return host_identity().key_id

    yield switch
    monkeypatch.setenv("TORPOR_HOME", homes["here"])


def test_push_signs_and_the_signature_is_kept_by_copies(
    dir_pool: Pool, world: Path, other_host: Callable[[str], str]
) -> None:
    mine = other_host("here")
    pushed = dir_pool.push(make_image(world / "local", "src"), "web")
    assert pushed.signer == mine
    assert dir_pool.copy_image("web", "web2").signer == mine
    with Pool("b", DirBackend(world / "b"), timing=FAST) as b:
        assert dir_pool.copy_image("web", "web3", to_pool=b).signer == mine
        other_host("there")
        assert b.image("web3").signer == mine


def test_an_untrusted_signer_is_refused_before_any_chunk_is_fetched(
    dir_pool: Pool, world: Path, other_host: Callable[[str], str]
) -> None:
    theirs = other_host("there")
    dir_pool.push(make_image(world / "local", "src"), "web")
    mine = other_host("here")
    assert mine != theirs
    guarded = Guarded(dir_pool.backend, forbid=("packs/", "lists/"))
    pool = Pool("shared", guarded, timing=FAST, policy=Policy(require_signed=True))  # type: ignore[arg-type]
    with pool, pytest.raises(SignatureError) as info:
        pool.pull("web")
    assert str(info.value) == (
        f"image 'web' in pool 'shared' is signed by key {theirs}, which pool 'shared' does not"
        f" trust; refused — if that host is trusted:"
        f" torpor pool set shared security.trusted_keys={theirs}"
    )
    assert [k for k in guarded.got if not k.startswith(("images/", "torpor-pool.json"))] == []
    assert not (Path(os.environ["TORPOR_HOME"]) / "cache" / "images").exists() or not list(
        (Path(os.environ["TORPOR_HOME"]) / "cache" / "images").iterdir()
    )


def test_a_trusted_signer_pulls(
    dir_pool: Pool, world: Path, other_host: Callable[[str], str]
) -> None:
    theirs = other_host("there")
    dir_pool.push(make_image(world / "local", "src"), "web")
    other_host("here")
    policy = Policy(require_signed=True, trusted_keys=frozenset({theirs}))
    with Pool("shared", dir_pool.backend, timing=FAST, policy=policy) as pool:
        image = pool.pull("web")
    image.verify(full=True)
    assert image.name == "web"


def test_own_key_is_always_trusted(dir_pool: Pool, world: Path) -> None:
    dir_pool.push(make_image(world / "local", "src"), "web")
    dir_pool.policy = Policy(require_signed=True)
    dir_pool.pull("web").verify(full=True)


def test_an_unsigned_image_is_refused_where_signatures_are_required(
    dir_pool: Pool, world: Path
) -> None:
    dir_pool.push(make_image(world / "local", "src"), "web")
    doc = _doc(dir_pool, "web")
    del doc["signature"]
    _put_doc(dir_pool, "web", doc)
    assert dir_pool.image("web").signer is None
    guarded = Guarded(dir_pool.backend, forbid=("packs/", "lists/"))
    pool = Pool("shared", guarded, timing=FAST, policy=Policy(require_signed=True))  # type: ignore[arg-type]
    with pool, pytest.raises(SignatureError, match=r"image 'web' in pool 'shared' is not signed"):
        pool.pull("web")


def test_a_changed_manifest_under_a_kept_signature_is_refused(dir_pool: Pool, world: Path) -> None:
    dir_pool.push(make_image(world / "local", "src"), "web")
    doc = _doc(dir_pool, "web")
    doc["manifest"]["cmdline"] = ["sh", "-c", "evil"]
    _put_doc(dir_pool, "web", doc)
    # Refused even where the pool requires nothing: a signature that does not cover the
    # manifest means the manifest was changed.
    with pytest.raises(ImageCorruptedError, match=r"its manifest is not the one that was signed"):
        dir_pool.pull("web")


def test_a_changed_signed_manifest_fails_its_signature(dir_pool: Pool, world: Path) -> None:
    dir_pool.push(make_image(world / "local", "src"), "web")
    doc = _doc(dir_pool, "web")
    # The attacker changes both copies the same way; only the signature can tell.
    doc["manifest"]["cmdline"] = ["sh", "-c", "evil"]
    signed = json.loads(doc["signature"]["manifest"])
    signed["cmdline"] = ["sh", "-c", "evil"]
    doc["signature"]["manifest"] = json.dumps(signed, indent=2, sort_keys=True) + "\n"
    _put_doc(dir_pool, "web", doc)
    guarded = Guarded(dir_pool.backend, forbid=("packs/", "lists/"))
    with Pool("shared", guarded, timing=FAST) as pool, pytest.raises(SignatureError) as info:  # type: ignore[arg-type]
        pool.pull("web")
    assert "its signature (key " in str(info.value)
    assert "does not match its manifest; refused" in str(info.value)


def test_copy_into_a_signed_pool_refuses_an_unsigned_image_before_fetching(
    dir_pool: Pool, world: Path
) -> None:
    dir_pool.push(make_image(world / "local", "src"), "web")
    doc = _doc(dir_pool, "web")
    del doc["signature"]
    _put_doc(dir_pool, "web", doc)
    guarded = Guarded(dir_pool.backend, forbid=("packs/", "lists/"))
    with (
        Pool("open", guarded, timing=FAST) as source,  # type: ignore[arg-type]
        Pool("strict", DirBackend(world / "strict"), policy=Policy(True)) as strict,
    ):
        with pytest.raises(SignatureError, match=r"in pool 'strict' is not signed"):
            source.copy_image("web", "web", to_pool=strict)
        assert list(strict.backend.list("images/")) == []
        assert list(strict.backend.list("packs/")) == []


def test_copy_out_of_a_signed_pool_refuses_an_untrusted_image(
    dir_pool: Pool, world: Path, other_host: Callable[[str], str]
) -> None:
    other_host("there")
    dir_pool.push(make_image(world / "local", "src"), "web")
    other_host("here")
    dir_pool.policy = Policy(require_signed=True)
    with Pool("b", DirBackend(world / "b")) as b:
        with pytest.raises(SignatureError, match=r"in pool 'shared' is signed by key"):
            dir_pool.copy_image("web", "web", to_pool=b)
        with pytest.raises(SignatureError, match=r"in pool 'shared' is signed by key"):
            dir_pool.export_image("web", io.BytesIO())


def test_import_into_a_signed_pool_checks_the_archive_signer(
    dir_pool: Pool, world: Path, other_host: Callable[[str], str]
) -> None:
    theirs = other_host("there")
    members = _export(dir_pool, world)
    other_host("here")
    with Pool("strict", DirBackend(world / "strict"), policy=Policy(True)) as strict:
        with pytest.raises(SignatureError, match=rf"signed by key {theirs}"):
            strict.import_image(_archive(members))
        assert list(strict.backend.list("packs/")) == []
        strict.policy = Policy(True, frozenset({theirs}))
        assert strict.import_image(_archive(members)).signer == theirs
        strict.pull("web").verify(full=True)


def test_no_laundering_through_a_pool_without_a_policy(
    dir_pool: Pool, world: Path, other_host: Callable[[str], str]
) -> None:
    theirs = other_host("there")
    members = _export(dir_pool, world)
    other_host("here")
    # Imported into a pool that checks nothing, then copied on by this (trusted) host: the
    # image keeps its maker's signature, which the strict pool does not trust.
    with (
        Pool("lax", DirBackend(world / "lax")) as lax,
        Pool("strict", DirBackend(world / "strict"), policy=Policy(True)) as strict,
    ):
        lax.import_image(_archive(members))
        with pytest.raises(SignatureError, match=rf"signed by key {theirs}"):
            lax.copy_image("web", "web", to_pool=strict)


def test_policy_keys_are_validated(world: Path) -> None:
    create_pool("p", "dir", {"source": str(world / "p")})
    with pytest.raises(PoolConfigError, match=r"security.require_signed: it must be true or false"):
        set_pool("p", {"security.require_signed": "yes"})
    with pytest.raises(PoolConfigError, match=r"'zz' is not one"):
        set_pool("p", {"security.trusted_keys": "zz"})
    key = host_identity().key_id
    set_pool("p", {"security.require_signed": "true", "security.trusted_keys": f"{key}, {key}"})
    with open_pool("p") as pool:
        assert pool.policy == Policy(True, frozenset({key}))


def test_the_local_signature_file_is_used_and_checked(dir_pool: Pool, world: Path) -> None:
    image = make_image(world / "local", "src")
    ident = host_identity()
    raw = (image.path / "torpor.json").read_bytes()
    # A local signature by some key (as an image made on another host carries).
    fd = os.open(image.path / "torpor.sig", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, json.dumps({"key": ident.key_id, "sig": ident.sign(raw + b"x").hex()}).encode())
    os.close(fd)
    with pytest.raises(SignatureError, match=r"torpor.sig does not match its manifest"):
        dir_pool.push(Image(image.path, image.manifest), "web")
    assert stat.S_ISREG(os.lstat(image.path / "torpor.sig").st_mode)


def test_a_pulled_image_is_not_vouched_for_by_this_host(
    dir_pool: Pool, world: Path, other_host: Callable[[str], str]
) -> None:
    theirs = other_host("there")
    dir_pool.push(make_image(world / "local", "src"), "web")
    other_host("here")
    pulled = dir_pool.pull("web")
    assert pulled.signer is None
    assert not (pulled.path / "torpor.sig").exists()
    # Pushing the cache copy on would make this host its signer: refused; copy keeps it.
    with (
        Pool("strict", DirBackend(world / "strict"), policy=Policy(True)) as strict,
        pytest.raises(SignatureError, match=r"was pulled from a pool and is not signed here"),
    ):
        strict.push(Image.open(pulled.path), "web")
    with Pool("other", DirBackend(world / "other")) as other:
        assert dir_pool.copy_image("web", "web", to_pool=other).signer == theirs


def test_a_planted_key_that_is_not_an_image_name_does_not_stop_the_listing(
    dir_pool: Pool, world: Path
) -> None:
    dir_pool.push(make_image(world / "local", "src"), "web")
    dir_pool.backend.put("images/..." + PWNED, b"junk")
    dir_pool.backend.put("images/a/b", b"junk")
    assert [i.name for i in dir_pool.list_images()] == ["web"]
    assert dir_pool.stats().images == 1
