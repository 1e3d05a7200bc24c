"""``torpor.sig``: the signature of an image's manifest by the host that made it.

The file is JSON, ``{"key": KEY_ID, "sig": HEX}``: ``KEY_ID`` is the signing host's key id
(:mod:`torpor._identity`: hex of its raw Ed25519 public key) and ``HEX`` the Ed25519 signature
of the exact bytes of ``torpor.json`` beside it. torpor writes manifests in one canonical form
(:meth:`Manifest.to_json`), so those bytes are also ``manifest.to_json().encode()`` and a
manifest carried elsewhere (a pool record) can be checked against the same signature.

A signature proves only who signed: a manifest re-signed with another key verifies too, as
that key's. Whoever decides whether to trust an image compares :attr:`Image.signer` with the
keys it trusts (a pool's ``security.trusted_keys``; this host's own key). What a signature
always catches is a manifest changed after it was signed, hashes rewritten to match changed
files included: that is refused here, whatever the policy.
"""

from __future__ import annotations

import json
import re

from .._errors import SignatureError
from .._identity import host_identity, is_key_id, verify_signature
from .._safe import read_regular
from ._layout import MAX_SIGNATURE, SIGNATURE_NAME

_SIG_RE = re.compile(r"[0-9a-f]{128}")  # 64 bytes


def sign(manifest_bytes: bytes) -> tuple[str, bytes]:
    """This host's key id and the ``torpor.sig`` content signing ``manifest_bytes``."""
    ident = host_identity()
    sig = ident.sign(manifest_bytes)
    return ident.key_id, json.dumps({"key": ident.key_id, "sig": sig.hex()}).encode()


def check(dir_fd: int, manifest_bytes: bytes, *, source: str) -> str | None:
    """The key id that signed ``manifest_bytes`` according to the ``torpor.sig`` in
    ``dir_fd``; None if there is no such file (an image made before torpor signed images).
    A signature file that is malformed, not a regular file, or does not verify raises
    :class:`SignatureError` (or :class:`~torpor.UnsafeImageError` for a symlink or FIFO)."""
    try:
        raw = read_regular(dir_fd, SIGNATURE_NAME, source=source, limit=MAX_SIGNATURE)
    except FileNotFoundError:
        return None
    return verify(raw, manifest_bytes, source=source)


def verify(sig_file: bytes, manifest_bytes: bytes, *, source: str) -> str:
    """The key id of the ``torpor.sig`` content ``sig_file`` if it signs ``manifest_bytes``;
    else :class:`SignatureError`."""
    try:
        data = json.loads(sig_file)
    except (ValueError, RecursionError) as exc:
        raise _malformed(source, "not JSON") from exc
    if not isinstance(data, dict) or set(data) != {"key", "sig"}:
        raise _malformed(source, 'not {"key", "sig"}')
    key, sig = data["key"], data["sig"]
    if not isinstance(key, str) or not is_key_id(key):
        raise _malformed(source, "its key is not a key id")
    if not isinstance(sig, str) or not _SIG_RE.fullmatch(sig):
        raise _malformed(source, "its signature is not 64 bytes of hex")
    if not verify_signature(key, manifest_bytes, bytes.fromhex(sig)):
        raise SignatureError(
            f"image {source}: {SIGNATURE_NAME} does not match its manifest (signed by key "
            f"{key}): the manifest was changed after it was signed; refused",
            image=source,
            hint="do not use this image; checkpoint again",
        )
    return key


def _malformed(source: str, what: str) -> SignatureError:
    return SignatureError(
        f"image {source}: {SIGNATURE_NAME} is malformed ({what}); refused",
        image=source,
        hint="the image was changed by something other than torpor: do not use it",
    )
