"""A big app for lazy restores: MiB of random memory, answers on triggers in a directory.

``lazy_ballast.py DIR MIB``: fills MIB MiB with random bytes (never zeros: a page that never
arrived would read as zeros), prints ``ready``, then polls DIR:

- ``DIR/ask-N`` (N any tag): reads 4 MiB of the ballast, prints ``answer N <sha256 of them>``;
- ``DIR/sum-N``: prints ``sum N <sha256 of all the ballast>`` (every page touched);
- ``DIR/each-N``: as ``sum-N``, but left in place: every copy polling DIR answers it once;
- ``DIR/sparse-N``: reads one byte in every 256 KiB of the ballast, prints ``sparse N <sha256
  of them>`` (a page here and there: what a warm set of scattered pages looks like).

``ask``, ``sum`` and ``sparse`` are answered once (removed first). stdout goes to the log, flushed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

directory, mib = sys.argv[1], int(sys.argv[2])
ballast = bytearray(os.urandom(mib << 20))
answered: set[str] = set()
print("ready", flush=True)
while True:
    for name in sorted(os.listdir(directory)):
        kind, _, tag = name.partition("-")
        if kind == "each" and name not in answered:
            answered.add(name)
            print(f"sum {tag} {hashlib.sha256(ballast).hexdigest()}", flush=True)
        if kind not in ("ask", "sum", "sparse"):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            continue
        if kind == "sparse":
            digest = hashlib.sha256(bytes(ballast[:: 256 << 10])).hexdigest()
        elif kind == "ask":
            digest = hashlib.sha256(ballast[(mib // 2) << 20 : ((mib // 2) + 4) << 20]).hexdigest()
        else:
            digest = hashlib.sha256(ballast).hexdigest()
        print(f"{kind if kind != 'ask' else 'answer'} {tag} {digest}", flush=True)
    time.sleep(0.002)
