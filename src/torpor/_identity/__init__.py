"""This host's identity: an Ed25519 key pair kept in the torpor home, made on first use.

It signs image manifests (so a pool can require images from trusted hosts only) and is the
identity the networked agent will present over TLS. A key is named by its *key id*: the hex
of its raw 32-byte public key, short enough to paste into ``security.trusted_keys``.

::

    ident = host_identity()
    sig = ident.sign(data)
    verify_signature(ident.key_id, data, sig)   # True
"""

from __future__ import annotations

from ._key import HostIdentity as HostIdentity
from ._key import IdentityError as IdentityError
from ._key import host_identity as host_identity
from ._key import is_key_id as is_key_id
from ._key import verify_signature as verify_signature

__all__ = ["HostIdentity", "IdentityError", "host_identity", "is_key_id", "verify_signature"]
