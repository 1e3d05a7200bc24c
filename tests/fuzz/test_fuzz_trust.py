"""Fuzzing the trust store's parsers: pairing tokens (pasted or sent by anyone), fingerprints,
and the store's files (``peers.json``, ``tokens.json``) as someone who can write them would
shape them. The verdict is always a value or a one-line :class:`~torpor.TorporError`, never
another exception or a hang, and nothing is written outside the home.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from torpor._identity._tls import is_fingerprint, parse_fingerprint
from torpor._identity._trust import (
    Peer,
    Token,
    TokenRefusedError,
    TrustError,
    TrustStore,
    format_token,
    parse_token,
)

from .support import DEEP_JSON, JSON_VALUES, Jail, bounded, dumps, mutated_json, verdict

FP = "sha256:" + "ab" * 32
VALID_TOKEN = Token(FP, "10.0.0.1:7000", bytes(range(32)), 2_000_000_000, "hostb")
TOKEN_DOC = json.loads(base64.urlsafe_b64decode(format_token(VALID_TOKEN).split(":", 1)[1] + "=="))
PEERS_DOC = {
    "version": 1,
    "peers": [
        {"name": "alpha", "fingerprint": FP, "cert": None, "added": 1, "via": "fingerprint"},
        {
            "name": "beta",
            "fingerprint": "sha256:" + "cd" * 32,
            "cert": None,
            "added": 2,
            "via": "token",
        },
    ],
}
TOKENS_DOC = {"version": 1, "tokens": [{"hash": "ef" * 32, "name": "gamma", "expires": 2**33}]}


def _text(doc: Any) -> str:
    return "torpor-token:" + base64.urlsafe_b64encode(dumps(doc)).rstrip(b"=").decode()


@given(mutated_json(TOKEN_DOC) | JSON_VALUES)
@example(TOKEN_DOC)
@example({**TOKEN_DOC, "v": True})
@example({**TOKEN_DOC, "exp": 2e9})
def test_parse_token_documents(doc: Any) -> None:
    with bounded():
        got = verdict(lambda: parse_token(_text(doc)))
    if isinstance(got, Token):
        # Accepted only as torpor writes it: the token, written again, is the same document.
        again = json.loads(base64.urlsafe_b64decode(format_token(got).split(":", 1)[1] + "=="))
        assert again == doc and [type(v) for v in again.values()] == [type(doc[k]) for k in again]
    else:
        assert isinstance(got, TrustError)
        assert dumps(doc) != dumps(TOKEN_DOC), f"the valid token was refused: {got}"


@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: "torpor-token:" + b.hex()))
@example("torpor-token:" + base64.urlsafe_b64encode(DEEP_JSON[0]).decode())
@example("torpor-token:" + "A" * 5000)
def test_parse_token_text(text: str) -> None:
    with bounded():
        got = verdict(lambda: parse_token(text))
    assert isinstance(got, TrustError)


@given(st.text(max_size=120) | st.sampled_from([FP, FP.upper(), ":".join(["AB"] * 32)]))
def test_parse_fingerprint(text: str) -> None:
    got = parse_fingerprint(text)
    assert got is None or (is_fingerprint(got) and parse_fingerprint(got) == got)


def _plant(jail: Jail, name: str, data: bytes) -> None:
    d = jail.home / "trust"
    d.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.close(fd)


@given(mutated_json(PEERS_DOC) | JSON_VALUES | st.sampled_from(DEEP_JSON))
@example(PEERS_DOC)
def test_peers_file(doc: Any) -> None:
    with Jail() as jail:
        _plant(jail, "peers.json", doc if isinstance(doc, bytes) else dumps(doc))
        with bounded():
            got = verdict(lambda: TrustStore().peers())
    if isinstance(got, list):
        assert all(isinstance(p, Peer) and is_fingerprint(p.fingerprint) for p in got)
        assert len({p.name for p in got}) == len(got) == len({p.fingerprint for p in got})
    else:
        assert isinstance(got, TrustError)
        assert doc != PEERS_DOC, f"the valid store was refused: {got}"


@given(mutated_json(TOKENS_DOC) | JSON_VALUES, st.binary(min_size=32, max_size=32))
@example(TOKENS_DOC, bytes(32))
def test_tokens_file(doc: Any, secret: bytes) -> None:
    from .test_fuzz_trust import _CERT

    with Jail() as jail:
        _plant(jail, "tokens.json", dumps(doc))
        with bounded():
            got = verdict(lambda: TrustStore().redeem_token(secret, _CERT))
    # No secret but the token's own redeems it: a random one never does.
    assert isinstance(got, TrustError)
    if doc == TOKENS_DOC:
        assert isinstance(got, TokenRefusedError)


def _cert() -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from torpor._identity._tls import new_identity_pem

    return x509.load_pem_x509_certificates(new_identity_pem("fuzz"))[0].public_bytes(Encoding.DER)


_CERT = _cert()
