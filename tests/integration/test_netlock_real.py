"""The lock table of a real CRIU dump, named from its image (``_netlock.dump_table``): a dump
with ``--tcp-established --network-lock nftables`` that kills its tree leaves exactly the
table the image's inventory names, and nothing else of the host's tables is taken for it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from torpor._migrate import _netlock

pytestmark = [
    pytest.mark.criu,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU dumps need root"),
    pytest.mark.skipif(shutil.which("criu") is None, reason="no criu on PATH"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="no nft on PATH"),
]

_CLIENT = (
    "import socket, sys, time\n"
    "c = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
    "time.sleep(120)\n"
)


def test_a_killing_tcp_dump_leaves_the_table_its_inventory_names(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )  # fmt: skip
    image = tmp_path / "image"
    image.mkdir()
    made: set[tuple[str, str]] = set()
    try:
        listener.settimeout(15)
        conn, _ = listener.accept()
        decoy = ("inet", "CRIU-00000000-0000-0000-0")  # another dump's table, made meanwhile
        _netlock._nft("add", "table", *decoy)
        made.add(decoy)
        before = _netlock.tables()
        dump = subprocess.run(
            ["criu", "dump", "-t", str(client.pid), "-D", str(image), "--tcp-established",
             "--network-lock", "nftables", "-o", "dump.log"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert dump.returncode == 0, (image / "dump.log").read_text()[-2000:]
        made |= _netlock.tables() - before
        fd = os.open(image, os.O_RDONLY | os.O_DIRECTORY)
        try:
            own = _netlock.dump_table(fd)
        finally:
            os.close(fd)
        assert own is not None and made - {decoy} == {own}
        assert _netlock.new_criu_tables(before | {decoy}) == {own}
        conn.close()
    finally:
        listener.close()
        if client.poll() is None:
            client.kill()
        client.wait(timeout=10)
        for table in made:
            _netlock.drop(table)
    assert not made & _netlock.tables()
