"""The target's lock against the real ``nft``, in a network namespace of the test's own (made by
``unshare --net`` for one child process, gone with it; the host's ruleset is never touched):
a lock named after a table that exists is refused by its creation itself and leaves that table
exactly as it was; a free name is made, bears its mark, and cannot be made twice. Through
libnftables and through the ``nft`` command both."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest

from .conftest import unavailable

pytestmark = [pytest.mark.root, pytest.mark.netns]

NAME = "CRIU-59b7beb0-a3e8-4f9d-98"  # as a peer may name its lock: here, another dump's table

# In the namespace: another dump's lock (as CRIU makes it: a set, chains, rules), then block.
_CHILD = """
import ipaddress, json, subprocess, sys
from torpor._migrate import _netlock

def ruleset():  # by the nft command, handles and all, whichever way the code under test runs
    return subprocess.run(["nft", "-a", "list", "ruleset"], capture_output=True, text=True,
                          check=True).stdout

if sys.argv[1] == "command":
    _netlock._lib = lambda: None
name = sys.argv[2]
_netlock._nft("-f", "-", stdin=f'''table inet {name} {{
  set conns4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; }}
  chain input {{
    type filter hook input priority 0; policy accept;
    meta mark 0xc114 accept
    ip saddr . tcp sport . ip daddr . tcp dport @conns4 drop
  }}
}}
''')
_netlock._nft("add", "element", "inet", name, "conns4", "{ 10.0.0.1 . 80 . 10.0.0.2 . 4242 }")
addrs = [ipaddress.ip_interface("10.0.0.100/24")]
out = {"before": ruleset()}
try:
    _netlock.block("ab12", addrs, criu=name)
except _netlock.LockTakenError as exc:
    out["refused"] = exc.msg
out["after"] = ruleset()
out["theirs_marked"] = _netlock.made_by_block(("inet", name), "ab12")
fresh = _netlock.block("cd34", addrs)
out["fresh"] = list(fresh)
out["fresh_marked"] = _netlock.made_by_block(fresh, "cd34")
try:
    _netlock.block("cd34", addrs)
except _netlock.LockTakenError as exc:
    out["again"] = exc.msg
out["tables"] = sorted(map(list, _netlock.tables()))
print(json.dumps(out))
"""


def _in_netns(how: str) -> dict[str, Any]:
    if os.geteuid() != 0:
        unavailable("needs root (a network namespace, nftables)")
    for tool in ("unshare", "nft"):
        if shutil.which(tool) is None:
            unavailable(f"no {tool} on PATH")
    res = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", _CHILD, how, NAME],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


@pytest.mark.parametrize("how", ["library", "command"])
def test_a_lock_named_after_a_table_here_is_refused_and_the_table_untouched(how: str) -> None:
    out = _in_netns(how)
    assert out["refused"] == (
        f"a table inet {NAME} exists here already: the lock was not made (nothing changed)"
    )
    assert f"table inet {NAME} " in out["before"]  # (the listing is of that table)
    assert out["after"] == out["before"]  # not a rule, set element or chain more, nor less
    assert out["theirs_marked"] is False
    assert out["fresh"] == ["inet", "torpor-mig-cd34"]
    assert out["fresh_marked"] is True
    assert out["again"] == (
        "a table inet torpor-mig-cd34 exists here already: the lock was not made (nothing changed)"
    )
    assert out["tables"] == [["inet", NAME], ["inet", "torpor-mig-cd34"]]
