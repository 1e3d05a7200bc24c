"""``torpor identity``: this host's signing identity (the key pools can be told to trust)."""

from __future__ import annotations

import argparse
from typing import Any

from ._app import App


def register(sub: Any) -> None:
    """Add ``torpor identity`` and its subcommands."""
    p = sub.add_parser("identity", help="this host's signing key (made on first use)")
    isub = p.add_subparsers(dest="identity_command", metavar="SUBCOMMAND", required=True)
    s = isub.add_parser(
        "show",
        help="print the host key id (for another pool's security.trusted_keys)",
    )
    s.add_argument("--json", action="store_true", help="output JSON (key id and key file)")
    s.add_argument(
        "--tls", action="store_true", help="print the TLS certificate fingerprint (for trust add)"
    )
    s.add_argument(
        "--cert", action="store_true", help="print the TLS certificate (for trust add --cert)"
    )
    s.set_defaults(handler=_show)


def _show(app: App, args: argparse.Namespace) -> int:
    from .._identity import host_identity
    from .._identity._tls import tls_identity

    ident = host_identity()
    tls = tls_identity()
    if args.json:
        app.json(
            {
                "key_id": ident.key_id,
                "key_path": str(ident.key_path),
                "tls_fingerprint": tls.fingerprint,
                "tls_path": str(tls.path),
            }
        )
    elif args.tls:
        app.out(tls.fingerprint)
    elif args.cert:
        app.out(_cert_pem(tls.cert_der).rstrip("\n"))
    else:
        app.out(ident.key_id)
        # stderr: stdout stays the key id alone, as scripts read it
        app.info(f"TLS certificate fingerprint: {tls.fingerprint}")
    return 0


def _cert_pem(der: bytes) -> str:
    import ssl

    return ssl.DER_cert_to_PEM_cert(der)
