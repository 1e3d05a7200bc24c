"""The host identity: made once (race-free), kept private, refused when unsafe; signatures."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from torpor._cli import main
from torpor._errors import UnsafePathError
from torpor._identity import IdentityError, host_identity, is_key_id, verify_signature


def test_made_on_first_use_private_and_stable(torpor_home: Path) -> None:
    ident = host_identity()
    key = torpor_home / "identity" / "host.key"
    assert ident.key_path == key
    assert stat.S_IMODE(os.lstat(key).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(key.parent).st_mode) == 0o700
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert is_key_id(ident.key_id)
    assert host_identity().key_id == ident.key_id
    assert sorted(os.listdir(key.parent)) == ["host.key"]


def test_key_loads_with_cryptography(torpor_home: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ident = host_identity()
    key = serialization.load_pem_private_key(ident.key_path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw.hex() == ident.key_id


def test_sign_and_verify(torpor_home: Path) -> None:
    ident = host_identity()
    sig = ident.sign(b"manifest bytes")
    assert len(sig) == 64
    assert verify_signature(ident.key_id, b"manifest bytes", sig) is True
    assert verify_signature(ident.key_id, b"manifest bytez", sig) is False
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert verify_signature(ident.key_id, b"manifest bytes", flipped) is False
    other = "ab" * 32
    assert verify_signature(other, b"manifest bytes", sig) is False


@pytest.mark.parametrize(
    ("key_id", "sig"),
    [
        ("", b"\0" * 64),
        ("zz" * 32, b"\0" * 64),
        ("AB" * 32, b"\0" * 64),  # upper case is not the form we write
        ("ab" * 31, b"\0" * 64),
        (None, b"\0" * 64),
        ("ab" * 32, b"\0" * 63),
        ("ab" * 32, "not bytes"),
        ("ab" * 32, None),
        ("00" * 32, b"\0" * 64),  # not a valid point, or not a valid signature
    ],
)
def test_verify_never_raises_on_malformed_input(key_id: object, sig: object) -> None:
    assert verify_signature(key_id, b"data", sig) is False  # type: ignore[arg-type]


def test_concurrent_first_use_agrees_on_one_key(torpor_home: Path) -> None:
    code = "from torpor._identity import host_identity; print(host_identity().key_id)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    ids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert len(ids) == 1
    assert ids == {host_identity().key_id}
    assert sorted(os.listdir(torpor_home / "identity")) == ["host.key"]


def test_symlinked_key_refused(torpor_home: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.key"
    host_identity()
    key = torpor_home / "identity" / "host.key"
    os.rename(key, target)
    key.symlink_to(target)
    with pytest.raises(UnsafePathError, match=r"host key .*host\.key is a symlink; refused"):
        host_identity()


def test_group_readable_key_refused(torpor_home: Path) -> None:
    ident = host_identity()
    os.chmod(ident.key_path, 0o640)
    with pytest.raises(UnsafePathError) as info:
        host_identity()
    assert str(info.value) == (
        f"host key {ident.key_path} is accessible by group or others (mode 0640); refused"
        f" — chmod 600 {ident.key_path}"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_key_owned_by_another_user_refused(torpor_home: Path) -> None:
    ident = host_identity()
    os.chown(ident.key_path, 4321, 4321)
    with pytest.raises(UnsafePathError, match=r"is owned by uid 4321"):
        host_identity()


def test_writable_identity_dir_refused(torpor_home: Path) -> None:
    host_identity()
    os.chmod(torpor_home / "identity", 0o777)
    with pytest.raises(UnsafePathError, match=r"chmod go-w .*identity$"):
        host_identity()


def test_key_that_is_a_fifo_refused_without_hanging(torpor_home: Path) -> None:
    (torpor_home / "identity").mkdir(mode=0o700)
    os.mkfifo(torpor_home / "identity" / "host.key", 0o600)
    with pytest.raises(UnsafePathError, match=r"is a FIFO, not a regular file"):
        host_identity()


def test_garbage_key_refused(torpor_home: Path) -> None:
    (torpor_home / "identity").mkdir(mode=0o700)
    key = torpor_home / "identity" / "host.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(IdentityError, match=r"is not a readable PEM private key"):
        host_identity()


def test_cli_identity_show(torpor_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["identity", "show"]) == 0
    assert capsys.readouterr().out == host_identity().key_id + "\n"


# Encodings of points of small order (and a non-canonical one): with such a public key a forged
# signature verifies for many messages under RFC 8032's rules, so they are never accepted.
_WEAK_KEYS = [
    "00" * 32,  # order 4
    "01" + "00" * 31,  # the identity
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p: non-canonical
]


@pytest.mark.parametrize("key_id", _WEAK_KEYS)
def test_small_order_keys_never_verify(key_id: str) -> None:
    # The all-zero key with an all-zero signature verifies b"other" in OpenSSL's Ed25519.
    assert [verify_signature(key_id, m, bytes(64)) for m in (b"other", b"", b"x" * 64)] == [
        False,
        False,
        False,
    ]


def test_small_order_check_keeps_real_keys(torpor_home: Path) -> None:
    from torpor._identity._key import _weak_key

    ident = host_identity()
    assert _weak_key(bytes.fromhex(ident.key_id)) is False
    assert verify_signature(ident.key_id, b"m", ident.sign(b"m")) is True
