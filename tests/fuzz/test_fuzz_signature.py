"""Fuzzing image signatures (``torpor.sig`` beside ``torpor.json``): a real signature of a real
manifest, then the signature file changed (hostile JSON values, random bytes) or the manifest
changed by a byte. ``verify`` returns the signing key id only for the exact manifest that key
signed, and otherwise raises :class:`~torpor.SignatureError` (never another exception);
``verify_signature`` never raises on any key id, data or signature.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import example, given
from hypothesis import strategies as st

from torpor._errors import SignatureError
from torpor._identity import verify_signature
from torpor._images import _signature

from .support import JSON_VALUES, bounded, dumps, mutated_json, verdict
from .test_fuzz_manifest import VALID

KEY = Ed25519PrivateKey.generate()
KEY_ID = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
MANIFEST = dumps(VALID)
SIG_DOC = {"key": KEY_ID, "sig": KEY.sign(MANIFEST).hex()}
# Ed25519 public keys of small order (the identity, and a point of order 8): every signature
# "verifies" against some of them, so they must be refused as keys.
WEAK_KEYS = [
    "01" + "00" * 31,  # the identity
    "00" * 32,  # order 4
    "ec" + "ff" * 30 + "7f",  # order 2
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
]
# R the identity, S = 0: OpenSSL accepts it for any message under the identity key (and the
# order-2 one), so only torpor's own refusal of such keys stops a forged signature.
FORGED = bytes.fromhex("01" + "00" * 63)


@given(mutated_json(SIG_DOC) | JSON_VALUES, st.integers(-1, len(MANIFEST) - 1))
@example(SIG_DOC, -1)
@example({**SIG_DOC, "key": WEAK_KEYS[0], "sig": FORGED.hex()}, -1)
@example({**SIG_DOC, "key": WEAK_KEYS[2], "sig": FORGED.hex()}, 3)
def test_verify(doc: Any, flip: int) -> None:
    manifest = bytearray(MANIFEST)
    if flip >= 0:
        manifest[flip] ^= 0x01
    with bounded():
        got = verdict(lambda: _signature.verify(dumps(doc), bytes(manifest), source="fuzz"))
    if isinstance(got, str):
        assert (got, flip, doc) == (KEY_ID, -1, SIG_DOC), "a signature that was not made verified"
    else:
        assert isinstance(got, SignatureError)
        assert not (doc == SIG_DOC and flip == -1), f"the real signature was refused: {got}"


@given(st.binary(max_size=200))
def test_verify_random_bytes(data: bytes) -> None:
    with bounded():
        got = verdict(lambda: _signature.verify(data, MANIFEST, source="fuzz"))
    assert isinstance(got, SignatureError)


@given(
    key=st.sampled_from([KEY_ID, *WEAK_KEYS]) | st.text(max_size=70) | st.binary(max_size=40),
    data=st.binary(max_size=50) | st.just(MANIFEST) | st.text(max_size=5),
    sig=st.sampled_from([bytes.fromhex(SIG_DOC["sig"]), bytes(64), FORGED])
    | st.binary(max_size=70),
)
def test_verify_signature_never_raises(key: Any, data: Any, sig: Any) -> None:
    with bounded():
        ok = verify_signature(key, data, sig)
    assert ok is (key == KEY_ID and data == MANIFEST and sig == bytes.fromhex(SIG_DOC["sig"]))


def test_the_weak_keys_are_refused() -> None:
    for key in WEAK_KEYS:
        assert not verify_signature(key, MANIFEST, FORGED), key
