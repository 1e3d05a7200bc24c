"""``bench/prefault.py``: a process's file pages faulted in from outside (process_vm_readv)."""

from __future__ import annotations

import mmap
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import prefault as pf

MAPPER = """\
import mmap, sys, time
f = open(sys.argv[1], 'rb')
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
print("ready", flush=True)
time.sleep(30)
"""


def rss_of(pid: int, path: str) -> int:
    """kB resident of ``pid``'s mapping of ``path`` (smaps)."""
    lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
            inside = line.rstrip().endswith(path)
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError(f"{path} not mapped")


def test_maps_lines_parse_and_bad_ones_are_left_out() -> None:
    text = (
        "7f00-7f10 r-xp 00000000 08:01 1234 /usr/lib/libx.so\n"
        "7f10-7f20 rw-p 00000000 00:00 0 \n"
        "garbage\n"
        "zz-7f30 r--p 00000000 08:01 1 /x\n"
    )
    maps = pf.parse_maps(text)
    assert [(m.start, m.end, m.inode, m.path) for m in maps] == [
        (0x7F00, 0x7F10, 1234, "/usr/lib/libx.so"),
        (0x7F10, 0x7F20, 0, ""),
    ]


def test_clip_keeps_only_what_lies_in_the_mappings() -> None:
    assert pf.clip([(0, 100), (150, 400)], [(50, 200), (300, 350)]) == [
        (50, 100),
        (150, 200),
        (300, 350),
    ]


def test_a_file_mapping_of_another_process_gets_resident(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"\x01" * (4 << 20))
    with open(data, "rb") as fh:  # the page cache warm, as for a restored app's libraries
        fh.read()
    proc = subprocess.Popen(
        [sys.executable, "-c", MAPPER, str(data)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(0.05)
        assert rss_of(proc.pid, str(data)) == 0  # mapped, never touched
        st = pf.prefault(proc.pid, step=mmap.PAGESIZE)
        assert st.touched >= (4 << 20) // mmap.PAGESIZE and st.failed == 0
        assert rss_of(proc.pid, str(data)) == 4 << 10  # every page in its page tables
    finally:
        proc.kill()
        proc.wait()
