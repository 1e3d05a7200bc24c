"""give (a keeper handing a self-dump's CRIU files to the unprivileged app) never hands over a
file that has a link elsewhere: a hard link to a root-only file planted in the directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torpor._errors import TorporError
from torpor._images._image import give
from torpor._safe import opened_dir


def test_give_never_hands_over_a_file_linked_elsewhere(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("root's secret\n")
    os.chmod(secret, 0o600)
    staged = tmp_path / "staged"
    staged.mkdir(mode=0o700)
    os.link(secret, staged / "pages-1.img")
    with opened_dir(staged) as fd, pytest.raises(TorporError):
        give(fd, ["pages-1.img"], (65534, 65534), source=str(staged))
    st = os.stat(secret)
    assert (st.st_uid, st.st_gid) == (0, 0)
