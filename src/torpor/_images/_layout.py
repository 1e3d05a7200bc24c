"""What an image directory holds, by name: CRIU's files (each listed in the manifest) and
torpor's own bookkeeping files (never listed, allowed beside them).

An image directory must hold *exactly* the files its manifest lists plus, at most, the
bookkeeping files named here: anything else is refused before CRIU could read it, so nothing
unverified is ever restored. The bookkeeping files are:

- ``torpor.json``, the manifest;
- ``torpor.sig``, the manifest's signature by the host that made the image;
- ``.torpor-verified.json``, the identities of the files as last hashed (see ``Image.verify``);
- ``criu-dump.log``, CRIU's log of the dump (kept for diagnosis; CRIU never reads it back);
- leftovers of an interrupted write: names beginning ``.torpor-tmp-`` (``_safe.replace_file``).

None of these is a name CRIU reads on restore (its files are ``*.img`` and a few fixed names
such as ``stats-dump``, which a dump writes and the manifest then lists).
"""

from __future__ import annotations

from .._safe import TEMP_PREFIX

MANIFEST_NAME = "torpor.json"
SIGNATURE_NAME = "torpor.sig"
VERIFIED_NAME = ".torpor-verified.json"
# The engine's DUMP_LOG (``_engine._criu``), spelt out rather than imported: importing it would
# load CRIU's RPC code into every command that opens an image, for one name.
DUMP_LOG = "criu-dump.log"

BOOKKEEPING = frozenset({MANIFEST_NAME, SIGNATURE_NAME, VERIFIED_NAME, DUMP_LOG})

# What every CRIU dump writes and every restore reads first: a manifest that does not list
# them does not describe a restorable image. (The per-task files, ``core-PID.img`` and the
# rest, need pstree.img decoded to name; CRIU refuses a restore that lacks one, and a file the
# manifest does not list cannot be in the directory, so nothing unverified gets in that way.)
REQUIRED_FILES = ("inventory.img", "pstree.img")

# Upper bounds on what is read whole into memory. A manifest lists a few files per process
# (~120 bytes each) plus the CPU flags; 64 MiB is thousands of times a real one.
MAX_MANIFEST = 64 << 20
MAX_SIGNATURE = 4096
MAX_STAMP = 64 << 20


def is_bookkeeping(name: str) -> bool:
    """Whether ``name`` is one of torpor's own files in an image directory (never listed in
    the manifest, never read by CRIU)."""
    return name in BOOKKEEPING or name.startswith(TEMP_PREFIX)
