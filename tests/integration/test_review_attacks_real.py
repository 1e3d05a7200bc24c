"""Attacks found by the adversarial review of issue 11 (helper R), tried as an unprivileged
user against root's real torpor (and real CRIU where it matters); each is refused.

- The launchers hand a command, with their stdin/stdout/stderr and environment, to whatever
  listens on ``<home>/agent.sock``: before the home is checked. Another user who can create
  that socket (a home that is not private) must not get root's terminal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import PYTHON

pytestmark = pytest.mark.criu

NOBODY = 65534  # uid and gid (nobody:nogroup)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def arena() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's own are root-only)."""
    base = Path(tempfile.mkdtemp(prefix="torpor-review-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base)


def as_nobody(code: str) -> str:
    """Python source that imports what ``code`` needs (root's interpreter is not readable
    by nobody), drops to nobody, then runs ``code``."""
    return (
        "import json, os, socket, sys, time\n"
        f"os.setgroups([]); os.setresgid({NOBODY}, {NOBODY}, {NOBODY}); "
        f"os.setresuid({NOBODY}, {NOBODY}, {NOBODY})\n" + code
    )


# -- the agent socket ----------------------------------------------------------------------------

FAKE_AGENT = """
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(sys.argv[1])
s.listen(1)
print("listening", flush=True)
s.settimeout(30)
c, _ = s.accept()
try:
    c.send(b"ready")
    data, anc, _, _ = c.recvmsg(1 << 20, socket.CMSG_SPACE(3 * 4))
except OSError:
    data, anc = b"", []
print(f"packet of {len(data)} bytes, {sum(len(a[2]) // 4 for a in anc)} fds", flush=True)
"""


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The native launcher, beside a stand-in torpor-py that says it ran instead."""
    bindir = tmp_path_factory.mktemp("bin")
    exe = bindir / "torpor"
    subprocess.run(
        ["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(ROOT / "bin/torpor.c")],
        check=True,
    )
    stand_in = bindir / "torpor-py"
    stand_in.write_text(f"#!{sys.executable}\nimport sys\nprint('fallback', *sys.argv[1:])\n")
    stand_in.chmod(0o755)
    return exe


@pytest.mark.parametrize("which", ["native", "python"])
def test_a_launcher_never_hands_its_terminal_to_another_users_agent_socket(
    arena: Path, native: Path, which: str
) -> None:
    home = arena / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    fake = subprocess.Popen(
        [PYTHON, "-c", as_nobody(FAKE_AGENT), str(home / "agent.sock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None
        assert fake.stdout.readline() == "listening\n"
        command = [str(native)] if which == "native" else [PYTHON, str(ROOT / "bin/torpor-py")]
        proc = subprocess.run(
            [*command, "ps"],
            capture_output=True,
            text=True,
            env=dict(os.environ, TORPOR_HOME=str(home), SECRET_TOKEN="hunter2"),
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        said, _ = fake.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            fake.kill()
        fake.wait()
    assert said == "packet of 0 bytes, 0 fds\n"  # connected, then left before sending
    if which == "native":
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "fallback ps\n", "")
    else:  # the command ran here, and refused the home
        assert (proc.returncode, proc.stdout) == (1, "")
        assert proc.stderr == (
            f"torpor: error: torpor home {home} is owned by uid {NOBODY}, not by root; "
            f"refused — chown 0 {home}\n"
        )
