"""The home's TLS identity: made once, private, stable; hostile files refused with one line."""

from __future__ import annotations

import hashlib
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from torpor._cli import main
from torpor._errors import UnsafePathError
from torpor._identity import IdentityError
from torpor._identity._tls import (
    _host_name,
    is_fingerprint,
    new_identity_pem,
    parse_fingerprint,
    tls_identity,
)


def test_made_on_first_use_private_and_stable(torpor_home: Path) -> None:
    ident = tls_identity()
    path = torpor_home / "identity" / "tls.pem"
    assert ident.path == path
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700
    assert tls_identity() == ident
    assert ident.fingerprint == "sha256:" + hashlib.sha256(ident.cert_der).hexdigest()
    assert is_fingerprint(ident.fingerprint)
    cert = x509.load_der_x509_certificate(ident.cert_der)
    assert isinstance(cert.public_key(), Ed25519PublicKey)
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cn == _host_name()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [_host_name()]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_loads_into_an_ssl_context(torpor_home: Path) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls_identity().load_into(ctx)  # raises if the key and certificate do not load


def test_concurrent_first_use_agrees(torpor_home: Path) -> None:
    code = "from torpor._identity._tls import tls_identity; print(tls_identity().fingerprint)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    fps = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert fps == {tls_identity().fingerprint}
    assert sorted(os.listdir(torpor_home / "identity")) == ["tls.pem"]


def _plant(home: Path, data: bytes, mode: int = 0o600) -> Path:
    d = home / "identity"
    d.mkdir(mode=0o700, exist_ok=True)
    path = d / "tls.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.write(fd, data)
    os.close(fd)
    os.chmod(path, mode)
    return path


def test_symlink_refused(torpor_home: Path, tmp_path: Path) -> None:
    (torpor_home / "identity").mkdir(mode=0o700)
    target = tmp_path / "elsewhere.pem"
    target.write_bytes(new_identity_pem())
    path = torpor_home / "identity" / "tls.pem"
    path.symlink_to(target)
    with pytest.raises(UnsafePathError) as info:
        tls_identity()
    assert str(info.value) == (
        f"TLS identity {path} is a symlink; refused — remove {path}"
        " (a new identity is made on next use; peers must trust it)"
    )


def test_group_readable_refused(torpor_home: Path) -> None:
    path = _plant(torpor_home, new_identity_pem(), 0o640)
    with pytest.raises(UnsafePathError) as info:
        tls_identity()
    assert str(info.value) == (
        f"TLS identity {path} is accessible by group or others (mode 0640); refused"
        f" — chmod 600 {path}"
    )


def test_fifo_refused_without_hanging(torpor_home: Path) -> None:
    (torpor_home / "identity").mkdir(mode=0o700)
    path = torpor_home / "identity" / "tls.pem"
    os.mkfifo(path, 0o600)
    with pytest.raises(UnsafePathError) as info:
        tls_identity()
    assert info.value.msg == f"TLS identity {path} is a FIFO, not a regular file; refused"


def test_other_owner_refused(torpor_home: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    path = _plant(torpor_home, new_identity_pem())
    os.chown(path, 4242, 4242)
    with pytest.raises(UnsafePathError) as info:
        tls_identity()
    assert info.value.msg == f"TLS identity {path} is owned by uid 4242, not by root; refused"


def test_writable_identity_dir_refused(torpor_home: Path) -> None:
    d = torpor_home / "identity"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o770)
    with pytest.raises(UnsafePathError) as info:
        tls_identity()
    assert info.value.msg == f"identity directory {d} is writable by its group (mode 0770); refused"


def test_huge_file_refused(torpor_home: Path) -> None:
    path = _plant(torpor_home, b"x" * (64 * 1024 + 1))
    with pytest.raises(IdentityError) as info:
        tls_identity()
    assert info.value.msg == f"TLS identity {path} is larger than 65536 bytes; refused"


def _mismatched() -> bytes:
    key_a = new_identity_pem().split(b"-----BEGIN CERTIFICATE-----")[0]
    cert_b = (
        b"-----BEGIN CERTIFICATE-----" + new_identity_pem().split(b"-----BEGIN CERTIFICATE-----")[1]
    )
    return key_a + cert_b


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"garbage", "is not a readable PEM key and certificate"),
        (
            new_identity_pem().split(b"-----BEGIN CERTIFICATE-----")[0],
            "is not a readable PEM key and certificate",
        ),
        (
            new_identity_pem() + new_identity_pem().split(b"-----END PRIVATE KEY-----\n")[1],
            "holds 2 certificates, not 1",
        ),
        (_mismatched(), ": the certificate is not of its key"),
    ],
)
def test_bad_content_refused(torpor_home: Path, content: bytes, problem: str) -> None:
    path = _plant(torpor_home, content)
    with pytest.raises(IdentityError) as info:
        tls_identity()
    sep = "" if problem.startswith(":") else " "
    assert info.value.msg == f"TLS identity {path}{sep}{problem}"


def test_non_ed25519_key_refused(torpor_home: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = _plant(torpor_home, key + new_identity_pem().split(b"-----END PRIVATE KEY-----\n")[1])
    with pytest.raises(IdentityError) as info:
        tls_identity()
    assert info.value.msg == f"TLS identity {path} is not an Ed25519 key"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("sha256:" + "ab" * 32, "sha256:" + "ab" * 32),
        ("SHA256:" + "AB" * 32, "sha256:" + "ab" * 32),
        (":".join(["AB"] * 32), "sha256:" + "ab" * 32),
        ("  " + "cd" * 32 + "\n", "sha256:" + "cd" * 32),
        ("sha256:" + "ab" * 31, None),
        ("sha1:" + "ab" * 32, None),
        ("sha256:" + "zz" * 32, None),
        (":".join(["ABC"] * 21 + ["A"]), None),
        ("", None),
        (None, None),
    ],
)
def test_parse_fingerprint(text: object, want: str | None) -> None:
    assert parse_fingerprint(text) == want


def test_cli_identity_show_tls(torpor_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["identity", "show", "--tls"]) == 0
    assert capsys.readouterr().out == tls_identity().fingerprint + "\n"
    assert main(["identity", "show", "--cert"]) == 0
    assert ssl.PEM_cert_to_DER_cert(capsys.readouterr().out) == tls_identity().cert_der
    assert main(["identity", "show"]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"TLS certificate fingerprint: {tls_identity().fingerprint}\n"
