"""Signed images in pools: who vouches for an image, and whether a pool trusts them.

A pool manifest carries the image's *origin*: the exact ``torpor.json`` text of the local
image it was pushed from, the key id that signed that text, and the Ed25519 signature (the
same bytes the local image's ``torpor.sig`` covers). The manifest the pool stores must be that
signed manifest with only the pool-side fields changed: its ``name``, its ``id`` and the
:data:`SOURCE_LABEL` label. Copies and imports carry the origin unchanged, so an image keeps
the signature of the host that made it wherever it goes, and laundering an image through a
pool without a policy does not make it trusted.

A pool's policy (``security.require_signed``, ``security.trusted_keys``) is checked on the
manifest alone, before any list or chunk is fetched. This host's own key is always trusted.
See ``docs/security.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import _paths, _safe
from .._errors import ImageCorruptedError, ImageError, SignatureError
from .._identity import host_identity, is_key_id, verify_signature
from .._images import _signature
from .._images._image import Image
from .._images._layout import MANIFEST_NAME, MAX_MANIFEST, MAX_SIGNATURE, SIGNATURE_NAME
from .._images._manifest import Manifest

SOURCE_LABEL = "torpor.source-id"
REQUIRE_KEY = "security.require_signed"
TRUSTED_KEY = "security.trusted_keys"


@dataclass(frozen=True)
class Origin:
    """The signed manifest of an image: its exact text, the signing key id, the signature."""

    manifest: str
    key: str
    sig: bytes

    def to_dict(self) -> dict[str, str]:
        """The JSON form kept in a pool manifest."""
        return {"manifest": self.manifest, "key": self.key, "sig": self.sig.hex()}

    @classmethod
    def from_dict(cls, data: object) -> Origin:
        """Parse the JSON form (errors: ``ValueError``/``TypeError``)."""
        if not isinstance(data, dict):
            raise TypeError("signature is not an object")
        text, key, sig = data.get("manifest"), data.get("key"), data.get("sig")
        if not isinstance(text, str) or len(text) > MAX_MANIFEST:
            raise ValueError("signed manifest is not a string of bounded size")
        if not is_key_id(key) or not isinstance(key, str):
            raise ValueError(f"signing key {key!r} is not a key id")
        if not isinstance(sig, str) or len(sig) != 128:
            raise ValueError("signature is not 64 bytes of hex")
        return cls(text, key, bytes.fromhex(sig))

    def valid(self) -> bool:
        """Whether the signature is ``key``'s over exactly ``manifest``."""
        return verify_signature(self.key, self.manifest.encode("utf-8"), self.sig)

    def signed_manifest(self, *, source: str) -> Manifest:
        """The manifest that was signed."""
        return Manifest.from_json(self.manifest, source=source)


def _pool_side_removed(m: Manifest) -> Manifest:
    labels = {k: v for k, v in m.labels.items() if k != SOURCE_LABEL}
    return m.evolve(name="", id="", labels=labels)


def covers(signed: Manifest, stored: Manifest) -> bool:
    """Whether ``stored`` is ``signed`` with only its pool-side fields (name, id, source
    label) changed: then the signature vouches for everything a restore uses."""
    return _pool_side_removed(signed) == _pool_side_removed(stored)


def local_origin(image: Image) -> tuple[Manifest, Origin]:
    """The manifest of a local image, read once from its exact ``torpor.json`` bytes, and its
    origin: the image's own ``torpor.sig`` (checked), else a signature made now with this
    host's key (the pushing host vouches for its unsigned local image, e.g. one made before
    torpor signed images). An unsigned image of the pool cache is refused instead: signing it
    here would make this host vouch for whatever the pool served."""
    source = str(image.path)
    try:
        with _safe.opened_dir(image.path) as dir_fd:
            raw = _safe.read_regular(dir_fd, MANIFEST_NAME, source=source, limit=MAX_MANIFEST)
            try:
                sig_file: bytes | None = _safe.read_regular(
                    dir_fd, SIGNATURE_NAME, source=source, limit=MAX_SIGNATURE
                )
            except FileNotFoundError:
                sig_file = None
    except OSError as exc:
        raise ImageError(f"cannot read image {source}: {exc.strerror}", image=source) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ImageCorruptedError(
            f"{source}: {MANIFEST_NAME} is not UTF-8", image=source, file=MANIFEST_NAME
        ) from exc
    manifest = Manifest.from_json(text, source=f"{source}/{MANIFEST_NAME}")
    if manifest != image.manifest:
        raise ImageCorruptedError(
            f"image {image.name!r} ({source}): {MANIFEST_NAME} changed since it was opened",
            image=source,
            file=MANIFEST_NAME,
            hint="push refused; run the command again",
        )
    if sig_file is not None:
        key = _signature.verify(sig_file, raw, source=source)  # SignatureError if it fails
        return manifest, Origin(text, key, bytes.fromhex(json.loads(sig_file)["sig"]))
    if _in_pool_cache(image.path):
        raise SignatureError(
            f"image {source} was pulled from a pool and is not signed here; push refused",
            image=source,
            hint="`torpor image copy NAME@POOL NAME@OTHER` copies it with its signature",
        )
    ident = host_identity()
    return manifest, Origin(text, ident.key_id, ident.sign(raw))


def _in_pool_cache(path: Path) -> bool:
    cache = _paths.home_path() / "cache" / "images"
    try:
        return path.resolve().is_relative_to(cache.resolve())
    except OSError:
        return False


@dataclass(frozen=True)
class Policy:
    """A pool's signature policy (from its ``security.*`` configuration keys)."""

    require_signed: bool = False
    trusted_keys: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> Policy:
        """The policy of an effective pool configuration (keys already validated)."""
        keys = frozenset(k.strip() for k in config.get(TRUSTED_KEY, "").split(",") if k.strip())
        return cls(config.get(REQUIRE_KEY, "false") == "true", keys)

    def check(self, image: str, pool: str, origin: Origin | None) -> None:
        """Refuse (:class:`SignatureError`) an image this policy does not accept: unsigned,
        or signed by a key that is neither this host's nor in ``trusted_keys``. A signature
        that does not match its manifest is refused whatever the policy."""
        if origin is not None and not origin.valid():
            raise SignatureError(
                f"image {image!r} in pool {pool!r}: its signature (key {origin.key}) does not"
                " match its manifest; refused",
                image=image,
                hint="the manifest was changed after it was signed: do not use this image",
            )
        if not self.require_signed:
            return
        if origin is None:
            raise SignatureError(
                f"image {image!r} in pool {pool!r} is not signed, and the pool requires"
                f" signed images ({REQUIRE_KEY}=true); refused",
                image=image,
                hint=f"push it again from a host whose key the pool trusts"
                f" (`torpor identity show` there, then `torpor pool set {pool} {TRUSTED_KEY}=KEY`)",
            )
        trusted = self.trusted_keys | {host_identity().key_id}
        if origin.key not in trusted:
            keys = ",".join([*sorted(self.trusted_keys), origin.key])
            raise SignatureError(
                f"image {image!r} in pool {pool!r} is signed by key {origin.key}, which pool"
                f" {pool!r} does not trust; refused",
                image=image,
                hint=f"if that host is trusted: torpor pool set {pool} {TRUSTED_KEY}={keys}",
            )
