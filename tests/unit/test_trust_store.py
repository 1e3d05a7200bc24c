"""The trust store: peers added, listed, removed; pairing tokens single-use, expiring and stored
hashed; hostile store files refused whole with one line; the ``torpor trust`` commands."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from torpor._cli import main
from torpor._errors import NotFoundError, UnsafePathError
from torpor._identity._tls import fingerprint, new_identity_pem, tls_identity
from torpor._identity._trust import (
    TokenRefusedError,
    TrustError,
    TrustStore,
    format_token,
    parse_token,
)


def _cert() -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificates(new_identity_pem())[0].public_bytes(Encoding.DER)


FP = "sha256:" + "ab" * 32


def test_add_list_remove(torpor_home: Path) -> None:
    store = TrustStore()
    cert = _cert()
    a = store.add("alpha", fingerprint_text=FP)
    b = store.add("beta", cert_der=cert, via="cert")
    assert [(p.name, p.fingerprint, p.cert_der, p.via) for p in store.peers()] == [
        ("alpha", FP, None, "fingerprint"),
        ("beta", fingerprint(cert), cert, "cert"),
    ]
    assert store.find(fingerprint(cert)) == b
    assert store.trusted_certs() == [cert]
    assert store.remove("alpha") == a
    assert store.remove(fingerprint(cert).upper().replace("SHA256:", "")) == b
    assert store.peers() == []
    path = torpor_home / "trust" / "peers.json"
    assert oct(os.lstat(path).st_mode & 0o777) == "0o600"
    assert oct(os.lstat(path.parent).st_mode & 0o777) == "0o700"


def test_duplicates_and_bad_names_refused(torpor_home: Path) -> None:
    store = TrustStore()
    store.add("alpha", fingerprint_text=FP)
    with pytest.raises(TrustError) as info:
        store.add("alpha", fingerprint_text="sha256:" + "cd" * 32)
    assert info.value.msg == f"a peer named 'alpha' is trusted already ({FP})"
    with pytest.raises(TrustError) as info:
        store.add("other", fingerprint_text=FP)
    assert info.value.msg == f"{FP} is trusted already, as 'alpha'"
    for bad in ["", "../x", "a b", "-x", "ab" * 32, "x" * 64, "a:b"]:
        with pytest.raises(TrustError, match="is not valid"):
            store.add(bad, fingerprint_text="sha256:" + "ef" * 32)
    with pytest.raises(NotFoundError):
        store.remove("nobody")
    assert [p.name for p in store.peers()] == ["alpha"]


def test_learn_cert_only_for_the_pinned_fingerprint(torpor_home: Path) -> None:
    store = TrustStore()
    cert = _cert()
    store.add("alpha", fingerprint_text=fingerprint(cert))
    assert store.learn_cert(_cert()) is False  # another certificate: nothing learnt
    assert store.peers()[0].cert_der is None
    assert store.learn_cert(cert) is True
    assert store.peers()[0].cert_der == cert


def _token(store: TrustStore, ttl: int = 60, name: str = "peer") -> str:
    return store.make_token(
        name, issuer_fingerprint=FP, issuer="issuer", address="10.0.0.1:7000", ttl=ttl
    )


def test_token_round_trip_and_stored_hashed(torpor_home: Path) -> None:
    store = TrustStore()
    text = _token(store)
    tok = parse_token(text)
    assert (tok.fingerprint, tok.address, tok.issuer, len(tok.secret)) == (
        FP,
        "10.0.0.1:7000",
        "issuer",
        32,
    )
    assert format_token(tok) == text
    stored = (torpor_home / "trust" / "tokens.json").read_bytes()
    assert tok.secret.hex().encode() not in stored
    assert base64.urlsafe_b64encode(tok.secret).rstrip(b"=") not in stored
    assert len(json.loads(stored)["tokens"]) == 1
    assert store.pending_tokens() == 1


def test_token_is_single_use(torpor_home: Path) -> None:
    store = TrustStore()
    tok = parse_token(_token(store))
    cert = _cert()
    peer = store.redeem_token(tok.secret, cert)
    assert (peer.name, peer.fingerprint, peer.cert_der, peer.via) == (
        "peer",
        fingerprint(cert),
        cert,
        "token",
    )
    with pytest.raises(TokenRefusedError) as info:
        store.redeem_token(tok.secret, _cert())
    assert info.value.msg == "pairing token refused (unknown, used already or expired)"
    assert [p.name for p in store.peers()] == ["peer"]
    assert store.pending_tokens() == 0


def test_token_expires(torpor_home: Path) -> None:
    store = TrustStore()
    tok = parse_token(_token(store, ttl=30))
    with pytest.raises(TokenRefusedError):
        store.redeem_token(tok.secret, _cert(), now=time.time() + 31)
    assert store.peers() == []
    with pytest.raises(TokenRefusedError):  # and it is gone, even with the clock back
        store.redeem_token(tok.secret, _cert())


def test_wrong_secret_refused_and_token_kept(torpor_home: Path) -> None:
    store = TrustStore()
    tok = parse_token(_token(store))
    wrong = bytes([tok.secret[0] ^ 1]) + tok.secret[1:]
    with pytest.raises(TokenRefusedError):
        store.redeem_token(wrong, _cert())
    assert store.pending_tokens() == 1
    assert store.redeem_token(tok.secret, _cert()).name == "peer"


def test_token_lifetime_bounds(torpor_home: Path) -> None:
    with pytest.raises(TrustError) as info:
        _token(TrustStore(), ttl=0)
    assert info.value.msg == "token lifetime 0 s is not between 1 s and 604800 s"


def _write(home: Path, name: str, data: bytes, mode: int = 0o600) -> Path:
    d = home / "trust"
    d.mkdir(mode=0o700, exist_ok=True)
    path = d / name
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def _peers_doc(**over: object) -> bytes:
    entry: dict[str, object] = {
        "name": "alpha",
        "fingerprint": FP,
        "cert": None,
        "added": 1,
        "via": "fingerprint",
    }
    entry.update(over)
    return json.dumps({"version": 1, "peers": [entry]}).encode()


def test_a_valid_planted_file_is_read(torpor_home: Path) -> None:
    _write(torpor_home, "peers.json", _peers_doc())
    assert [p.name for p in TrustStore().peers()] == ["alpha"]


@pytest.mark.parametrize(
    ("data", "mode", "problem"),
    [
        (_peers_doc(), 0o620, "is writable by group or others (mode 0620); refused"),
        (_peers_doc(), 0o640, "is accessible by group or others (mode 0640); refused"),
        (b"{not json", 0o600, "is not JSON; refused"),
        (b'{"version": 2, "peers": []}', 0o600, "is not a version-1 peers list; refused"),
        (_peers_doc(name="../x"), 0o600, ": peer 0 has an invalid name; refused"),
        (
            _peers_doc(fingerprint="sha256:AB"),
            0o600,
            ": peer 0 has an invalid fingerprint; refused",
        ),
        (_peers_doc(via="magic"), 0o600, ": peer 0 has an invalid added time or via; refused"),
        (_peers_doc(cert="!!"), 0o600, ": peer 0 has an invalid certificate; refused"),
        (
            _peers_doc(cert=base64.b64encode(_cert()).decode()),
            0o600,
            ": peer 0 has a certificate whose fingerprint is not the one listed; refused",
        ),
        (b"[" * 100_000 + b"]" * 100_000, 0o600, "is not JSON; refused"),
    ],
)
def test_hostile_peers_file_refused(
    torpor_home: Path, data: bytes, mode: int, problem: str
) -> None:
    path = _write(torpor_home, "peers.json", data, mode)
    with pytest.raises(TrustError) as info:
        TrustStore().peers()
    sep = "" if problem.startswith(":") else " "
    assert info.value.msg == f"trust store file {path}{sep}{problem}"


def test_symlinked_peers_file_refused(torpor_home: Path, tmp_path: Path) -> None:
    (torpor_home / "trust").mkdir(mode=0o700)
    target = tmp_path / "peers.json"
    target.write_bytes(_peers_doc())
    path = torpor_home / "trust" / "peers.json"
    path.symlink_to(target)
    with pytest.raises(TrustError) as info:
        TrustStore().peers()
    assert info.value.msg == f"trust store file {path} is a symlink; refused"


def test_fifo_peers_file_refused_without_hanging(torpor_home: Path) -> None:
    (torpor_home / "trust").mkdir(mode=0o700)
    path = torpor_home / "trust" / "peers.json"
    os.mkfifo(path, 0o600)
    with pytest.raises(TrustError) as info:
        TrustStore().peers()
    assert info.value.msg == f"trust store file {path} is a FIFO, not a regular file; refused"


def test_hostile_tokens_file_refused(torpor_home: Path) -> None:
    path = _write(torpor_home, "tokens.json", b'{"version": 1, "tokens": [{"hash": "x"}]}')
    with pytest.raises(TrustError) as info:
        TrustStore().redeem_token(b"x" * 32, _cert())
    assert info.value.msg == f"trust store file {path}: token 0 is not valid; refused"


def test_writable_trust_dir_refused(torpor_home: Path) -> None:
    d = torpor_home / "trust"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o777)
    with pytest.raises(UnsafePathError) as info:
        TrustStore().peers()
    assert info.value.msg == f"trust store {d} is writable by others (mode 0777); refused"


def test_cli(torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert_file = tmp_path / "peer.pem"
    cert_file.write_bytes(new_identity_pem().split(b"-----END PRIVATE KEY-----\n")[1])
    assert main(["trust", "add", FP, "--name", "alpha"]) == 0
    assert capsys.readouterr().out == f"trusted alpha ({FP})\n"
    assert main(["trust", "add", "--cert", str(cert_file), "--name", "beta"]) == 0
    capsys.readouterr()
    assert main(["trust", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(p["name"], p["has_cert"], p["via"]) for p in listed] == [
        ("alpha", False, "fingerprint"),
        ("beta", True, "cert"),
    ]
    assert main(["trust", "token", "--name", "gamma", "--ttl", "60"]) == 0
    text = capsys.readouterr().out.strip()
    assert parse_token(text).fingerprint == tls_identity().fingerprint
    assert main(["trust", "remove", "alpha"]) == 0
    assert capsys.readouterr().out == f"removed alpha ({FP})\n"
    assert main(["trust", "add", "sha256:nothex", "--name", "delta"]) == 1
    assert capsys.readouterr().err == (
        "torpor: error: 'sha256:nothex' is not a certificate fingerprint"
        " — give it as sha256:<64 hex digits> (torpor identity show on the peer)\n"
    )


def test_cli_add_token(
    torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issuer = tmp_path / "issuer"
    issuer.mkdir(mode=0o700)
    ifp = tls_identity(issuer).fingerprint
    text = TrustStore(issuer).make_token(
        "me", issuer_fingerprint=ifp, issuer="hostb", address=None, ttl=60
    )
    assert main(["trust", "add", text]) == 0
    assert capsys.readouterr().out == f"trusted hostb ({ifp})\n"
    assert [(p.name, p.via) for p in TrustStore().peers()] == [("hostb", "token")]
