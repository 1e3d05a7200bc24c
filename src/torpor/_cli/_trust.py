"""``torpor trust``: the peers (other hosts' TLS certificates) this host accepts, as LXD's
trust store: add by fingerprint, certificate or pairing token; list; remove; make tokens."""

from __future__ import annotations

import argparse
import os
import stat
import time
from typing import Any

from .._errors import UsageError
from ._app import App

DEFAULT_TTL = 3600


def register(sub: Any) -> None:
    """Add ``torpor trust`` and its subcommands."""
    p = sub.add_parser("trust", help="the peer hosts this host accepts (mutual TLS)")
    tsub = p.add_subparsers(dest="trust_command", metavar="SUBCOMMAND", required=True)

    a = tsub.add_parser(
        "add",
        help="trust a peer: by FINGERPRINT (sha256:...), a TOKEN from its `trust token`,"
        " or --cert FILE",
    )
    a.add_argument("target", metavar="FINGERPRINT|TOKEN", nargs="?")
    a.add_argument("--cert", metavar="FILE", help="the peer's certificate (PEM or DER)")
    a.add_argument("--name", metavar="NAME", help="what to call the peer (a token names one)")
    a.add_argument("--json", action="store_true", help="output JSON")
    a.set_defaults(handler=_add)

    ls = tsub.add_parser("list", help="list the trusted peers")
    ls.add_argument("--json", action="store_true", help="output JSON")
    ls.set_defaults(handler=_list)

    rm = tsub.add_parser("remove", help="stop trusting a peer")
    rm.add_argument("which", metavar="NAME|FINGERPRINT")
    rm.set_defaults(handler=_remove)

    tk = tsub.add_parser("token", help="print a one-time pairing token for a peer to add")
    tk.add_argument("--name", metavar="NAME", required=True, help="what to call the peer here")
    tk.add_argument("--ttl", metavar="SECONDS", type=int, default=DEFAULT_TTL, help="lifetime")
    tk.add_argument("--address", metavar="HOST[:PORT]", help="where peers reach this host")
    tk.set_defaults(handler=_token)


def _read_cert_file(path: str) -> bytes:
    from .._identity._trust import MAX_CERT, TrustError

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TrustError(f"cannot open certificate {path}: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device would hang or never end
            raise TrustError(f"certificate {path} is not a regular file")
        return os.read(fd, MAX_CERT * 2 + 1)
    finally:
        os.close(fd)


def _add(app: App, args: argparse.Namespace) -> int:
    from .._identity._trust import TOKEN_PREFIX, TrustStore, check_peer_name, parse_token

    store = TrustStore()
    if args.cert is not None:
        if args.target is not None:
            raise UsageError("give a FINGERPRINT, a TOKEN or --cert FILE, not two of them")
        if args.name is None:
            raise UsageError("--name is required with --cert")
        peer = store.add(
            check_peer_name(args.name), cert_der=_read_cert_file(args.cert), via="cert"
        )
    elif args.target is None:
        raise UsageError("give a FINGERPRINT, a TOKEN or --cert FILE")
    elif args.target.strip().startswith(TOKEN_PREFIX):
        token = parse_token(args.target)
        if token.expires <= time.time():
            raise UsageError(
                "this pairing token has expired", hint="make a new one with torpor trust token"
            )
        # This host now trusts the issuer; the issuer trusts this host once the token's secret
        # and this host's certificate reach it (TrustStore.redeem_token, over the networked
        # agent's channel: not built yet).
        peer = store.add(args.name or token.issuer, fingerprint_text=token.fingerprint, via="token")
    else:
        if args.name is None:
            raise UsageError("--name is required with a FINGERPRINT")
        peer = store.add(check_peer_name(args.name), fingerprint_text=args.target)
    if args.json:
        app.json(peer.to_json())
    else:
        app.out(f"trusted {peer.name} ({peer.fingerprint})")
    return 0


def _list(app: App, args: argparse.Namespace) -> int:
    from .._identity._trust import TrustStore

    peers = TrustStore().peers()
    if args.json:
        app.json([p.to_json() for p in peers])
        return 0
    rows = [
        [
            p.name,
            p.fingerprint,
            "yes" if p.cert_der else "no",
            p.via,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(p.added)),
        ]
        for p in peers
    ]
    app.table(["NAME", "FINGERPRINT", "CERT", "VIA", "ADDED"], rows)
    return 0


def _remove(app: App, args: argparse.Namespace) -> int:
    from .._identity._trust import TrustStore

    peer = TrustStore().remove(args.which)
    app.out(f"removed {peer.name} ({peer.fingerprint})")
    return 0


def _token(app: App, args: argparse.Namespace) -> int:
    from .._identity._tls import _host_name, tls_identity
    from .._identity._trust import TrustStore

    token = TrustStore().make_token(
        args.name,
        issuer_fingerprint=tls_identity().fingerprint,
        issuer=_host_name(),
        address=args.address,
        ttl=args.ttl,
    )
    app.out(token)
    return 0
