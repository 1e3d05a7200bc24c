"""Fuzzing what a pool holds, as a shared pool (or a tampered one) would serve it: the pool
manifest of an image (zstd JSON: file names, ids, sizes, chunk lists, the embedded image
manifest, the signature), its list objects, pack indexes, packs and ``torpor-pool.json`` are
each replaced by random bytes, truncated, bit-flipped, deleted, or decoded and given hostile
values; keys with hostile names are planted; in a ``dir`` pool, files become symlinks (to
``/dev/zero``, out of the pool), FIFOs or directories.

Then everything a user can do with the pool (list, show, pull, copy to another pool, export,
import the export, stats, gc) ends with success or a :class:`~torpor.TorporError`, in bounded
time, writing nothing outside the home; a pulled image is complete and verified, inside the
home's cache.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from torpor import TorporError
from torpor._images._image import Image
from torpor._pools import MemoryBackend, Pool, Timing
from torpor._pools._dir import DirBackend
from torpor._pools._record import Record
from torpor._pools._sign import Policy, covers

from .support import (
    DEEP_JSON,
    JSON_VALUES,
    Jail,
    bounded,
    escaping_names,
    fill,
    in_child,
    make_image,
    mutated_json,
    scaled,
    verdict,
)

FAST = Timing(heartbeat=0.05, stale=5.0, poll=0.01)
NAME = "web"


@functools.cache
def base_objects() -> dict[str, bytes]:
    """Every object of a pool holding one pushed image (made once)."""
    with Jail() as jail:
        backend = MemoryBackend()
        with Pool("base", backend, timing=FAST, sessions=False) as pool:
            pool.push(make_image(jail.home / "images"), NAME)
            return {k: backend.get(k) for k in backend.list("")}


def _decoded(blob: bytes) -> Any:
    return json.loads(zstandard.ZstdDecompressor().decompress(blob))


def _encoded(doc: Any) -> bytes:
    return zstandard.ZstdCompressor().compress(json.dumps(doc).encode())


@st.composite
def tampered(draw: st.DrawFn) -> list[tuple[str, str, Any]]:
    """A list of (key, operation, argument) changes to the base pool."""
    base = base_objects()
    keys = sorted(base)
    changes: list[tuple[str, str, Any]] = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        op = draw(
            st.sampled_from(
                ["json", "json", "json", "bytes", "truncate", "flip", "delete", "plant", "kind"]
                + ["sig"] * 2
            )
        )
        arg: Any = None
        if op == "json":
            if key.startswith("images/"):
                arg = draw(mutated_json(_decoded(base[key])))
            elif key == "torpor-pool.json":
                arg = draw(mutated_json(json.loads(base[key])))
            else:
                op, arg = "bytes", draw(st.binary(max_size=64))
        elif op == "bytes":
            arg = draw(st.binary(max_size=256))
        elif op in ("truncate", "flip"):
            arg = draw(st.integers(0, max(0, len(base[key]) - 1)))
        elif op == "plant":
            # The image's record again, under a key no torpor would make.
            key = "images/" + draw(escaping_names() | st.sampled_from(["..", ".", "a/../../b"]))
            arg = base["images/" + NAME]
        elif op == "kind":
            arg = draw(st.sampled_from(["symlink-zero", "symlink-out", "fifo", "dir"]))
        elif op == "sig":
            key = "images/" + NAME
            arg = draw(st.sampled_from(["drop", "foreign", "foreign-changed", "replay"]))
        changes.append((key, op, arg))
    return changes


def _apply(objects: dict[str, bytes], changes: list[tuple[str, str, Any]], jail: Jail) -> None:
    for key, op, arg in changes:
        if op == "json":
            doc = jail.fill(arg)
            objects[key] = _encoded(doc) if key.startswith("images/") else json.dumps(doc).encode()
        elif op == "bytes":
            objects[key] = arg
        elif op == "truncate":
            objects[key] = objects.get(key, b"")[:arg]
        elif op == "flip" and key in objects and objects[key]:
            data = bytearray(objects[key])
            data[arg % len(data)] ^= 0x41
            objects[key] = bytes(data)
        elif op == "delete":
            objects.pop(key, None)
        elif op == "plant":
            objects[jail.fill(key)] = arg
        elif op == "sig" and key in objects:
            with contextlib.suppress(zstandard.ZstdError, ValueError, KeyError, TypeError):
                objects[key] = _encoded(_resigned(_decoded(objects[key]), arg))


def _resigned(doc: dict[str, Any], how: str) -> dict[str, Any]:
    """A pool record whose signature was dropped, replaced by a valid one of a key nobody
    trusts (over the same manifest, or over one changed to run something else, the record
    changed to match), or kept while the record's manifest was changed."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    doc = dict(doc)
    if how == "drop":
        doc.pop("signature", None)
        return doc
    evil = {**doc["manifest"], "cmdline": ["sh", "-c", "evil"]}
    if how == "replay":
        doc["manifest"] = evil
        return doc
    text = doc["signature"]["manifest"]
    if how == "foreign-changed":
        text = json.dumps({**json.loads(text), "cmdline": ["sh", "-c", "evil"]})
        doc["manifest"] = evil
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    doc["signature"] = {"manifest": text, "key": pub, "sig": key.sign(text.encode()).hex()}
    return doc


def _dir_path(root: Path, key: str) -> Path:
    # The dir driver's documented layout: every segment but the last carries a "+".
    *dirs, last = key.split("/")
    return root.joinpath(*(d + "+" for d in dirs), last)


def signer() -> str:
    """The key id that signed the base image (its maker's host key, not the example's)."""
    key: str = _decoded(base_objects()["images/" + NAME])["signature"]["key"]
    return key


def policy(signed: bool) -> Policy:
    """No policy, or one requiring the base image's signer."""
    return Policy(require_signed=True, trusted_keys=frozenset({signer()})) if signed else Policy()


def memory_pool(objects: dict[str, bytes], *, signed: bool = False) -> Pool:
    backend = MemoryBackend()
    # Planted keys break the key contract on purpose: a backend (a dir pool listing files
    # someone put there) may return them.
    backend._objects.update(objects)
    return Pool("fz", backend, timing=FAST, policy=policy(signed))


def dir_pool(
    jail: Jail,
    objects: dict[str, bytes],
    changes: list[tuple[str, str, Any]],
    *,
    signed: bool = False,
) -> Pool:
    root = jail.home / "pools" / "fz-data"
    backend = DirBackend(root)
    for key, data in objects.items():
        path = _dir_path(root, key)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o600)
    for key, op, arg in changes:
        path = _dir_path(root, key)
        if op != "kind" or not os.path.lexists(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # made a directory by an earlier change
        else:
            path.unlink()
        if arg == "symlink-zero":
            path.symlink_to("/dev/zero")
        elif arg == "symlink-out":
            path.symlink_to(jail.outside / "sentinel")
        elif arg == "fifo":
            os.mkfifo(path, 0o600)
        else:
            path.mkdir(mode=0o700)
    return Pool("fz", backend, timing=FAST, policy=policy(signed))


def use(pool: Pool, jail: Jail, *, strict: bool = False) -> None:
    """Everything a user can do with a pool; each step a success or a TorporError (with
    ``strict``, a success)."""
    other = Pool("other", MemoryBackend(), timing=FAST, policy=pool.policy)
    steps = [
        pool.list_images,
        lambda: pool.image(NAME),
        lambda: pulled(pool, jail),
        lambda: pool.copy_image(NAME, "copy", to_pool=other),
        lambda: pool.copy_image(NAME, "same"),
        lambda: export_import(pool, other),
        pool.stats,
        lambda: pool.gc(wait=0.2),
    ]
    for step in steps:
        with contextlib.suppress(*(() if strict else (TorporError,))):
            step()


def pulled(pool: Pool, jail: Jail) -> None:
    image = pool.pull(NAME)
    cache = (jail.home / "cache").resolve()
    assert image.path.resolve().is_relative_to(cache), f"pulled to {image.path}"
    Image.open(image.path).verify(full=True)
    names = sorted(f.name for f in image.manifest.files)
    assert names == sorted(
        n for n in os.listdir(image.path) if not n.startswith((".", "torpor."))
    ), "the pulled image holds other files than its manifest lists"
    if pool.policy.require_signed:
        # What a signed pool promises: the image restored is the one its trusted maker signed.
        rec = Record.decode(NAME, pool.backend.get("images/" + NAME), pool=pool.name)
        assert rec.origin is not None and rec.origin.key == signer() and rec.origin.valid()
        assert covers(rec.origin.signed_manifest(source="fuzz"), image.manifest), (
            "a pull from a signed pool gave an image its signature does not cover"
        )


def export_import(pool: Pool, other: Pool) -> None:
    buf = io.BytesIO()
    pool.export_image(NAME, buf)
    buf.seek(0)
    other.import_image(buf, "imported")


def test_the_untouched_pools_work() -> None:
    with Jail() as jail:
        pool = memory_pool(dict(base_objects()))
        assert [i.name for i in pool.list_images()] == [NAME]
        assert in_child(lambda: use(pool, jail, strict=True)) == {"kind": "ok"}
    with Jail() as jail:
        pool = dir_pool(jail, dict(base_objects()), [])
        assert in_child(lambda: use(pool, jail, strict=True)) == {"kind": "ok"}
    with Jail() as jail:
        pool = memory_pool(dict(base_objects()), signed=True)
        assert in_child(lambda: use(pool, jail, strict=True)) == {"kind": "ok"}


def decoded(blob: bytes) -> None:
    with bounded():
        got = verdict(lambda: Record.decode(NAME, blob, pool="fz"))
    assert isinstance(got, Record | TorporError)


@pytest.mark.parametrize("text", DEEP_JSON, ids=["array", "object"])
def test_record_decode_deep_nesting(text: bytes) -> None:
    decoded(zstandard.ZstdCompressor().compress(text))


@given(st.binary(max_size=256))
def test_record_decode_random_bytes(blob: bytes) -> None:
    decoded(blob)
    decoded(zstandard.ZstdCompressor().compress(blob))


@given(JSON_VALUES)
def test_record_decode_random_json(doc: Any) -> None:
    decoded(_encoded(doc))


@given(st.data())
def test_record_decode_hostile_values(data: st.DataObject) -> None:
    doc = data.draw(mutated_json(_decoded(base_objects()["images/" + NAME])))
    decoded(_encoded(fill(doc)))


@scaled(0.5)
@given(tampered(), st.booleans())
def test_memory_pool(changes: list[tuple[str, str, Any]], signed: bool) -> None:
    with Jail() as jail:
        objects = dict(base_objects())
        _apply(objects, changes, jail)
        in_child(lambda: use(memory_pool(objects, signed=signed), jail), seconds=8)


@scaled(0.5)
@given(tampered(), st.booleans())
def test_dir_pool(changes: list[tuple[str, str, Any]], signed: bool) -> None:
    with Jail() as jail:
        objects = dict(base_objects())
        _apply(objects, [c for c in changes if c[1] != "plant"], jail)
        in_child(lambda: use(dir_pool(jail, objects, changes, signed=signed), jail), seconds=8)
