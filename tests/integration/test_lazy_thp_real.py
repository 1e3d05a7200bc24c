"""A lazy copy with a warm set on a host with transparent huge pages ``always`` (real CRIU).

The warm set puts eager pages into VMAs whose other pages stay lazy. With THP ``always`` and
CRIU's restore left as it was, the first eager page read into a 2 MiB range made a huge page
there, its other pages zeros that never fault: the copy's checksum came out wrong and its
lazy-pages daemon retried their ``UFFDIO_COPY`` (EEXIST) for ever, the copy never resident
(``src/torpor/_engine/_thp.py``). The host's THP mode is set to ``always`` for the test and put
back after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._lazy import _restore as lazy
from torpor._lazy import _warm

from .helpers import copy_log, torpor, wait_for
from .test_lazy_restore_real import _ask, _image, _lines, _restore_lazy, daemons  # noqa: F401

pytestmark = pytest.mark.criu

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.fixture
def thp_always() -> Iterator[None]:
    if not THP.exists():
        pytest.skip("this kernel has no transparent huge pages")
    text = THP.read_text()
    before = text[text.index("[") + 1 : text.index("]")]
    THP.write_text("always")
    try:
        yield
    finally:
        THP.write_text(before)


def _thp_enabled(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("THP_enabled:"):
            return line.split()[1]
    raise AssertionError(f"no THP_enabled in /proc/{pid}/status")


def _sparse(trig: Path, log: Path, tag: str) -> str:
    """The copy's ``sparse`` answer: one byte in every 256 KiB of its ballast."""
    (trig / f"sparse-{tag}").touch()
    got = wait_for(lambda: _lines(log, "sparse").get(tag), timeout=30, what=f"sparse {tag}")
    assert isinstance(got, str)
    return got


def test_a_warm_lazy_copy_is_right_and_resident_with_thp_always(
    thp_always: None,
    torpor_home: Path,
    tmp_path: Path,
    daemons: list[int],  # noqa: F811
) -> None:
    from torpor._images._image import Image

    trig, answer, total = _image(torpor_home, tmp_path, "thp")
    image = Image.open(torpor_home / "images" / "thp-img")
    # The first lazy copy records its warm set: a page here and there, read at once, before
    # the daemon's background push gets to them (nothing eager yet: no huge page can form).
    assert len(_restore_lazy("thp-img", "--name", "t1")) == 1
    log = copy_log(torpor_home, "t1")
    sparse = _sparse(trig, log, "t1")
    assert lazy.wait_states(["t1"], timeout=60)["t1"].state == "resident"
    assert _ask(trig, log, "sum", "t1") == total
    warm = _warm.load(image)
    assert sum(r[2] for r in warm) > 64 * 4096, "too small a warm set: it would prove nothing"
    torpor("stop", "t1")
    # The second restores that warm set eagerly, inside VMAs that are otherwise lazy.
    assert len(_restore_lazy("thp-img", "--name", "t2")) == 1
    st = lazy.read_state("t2")
    assert st is not None and st.daemon_pid is not None and st.pid is not None
    daemons.append(st.daemon_pid)
    assert st.warm_bytes == sum(r[2] for r in warm), st
    log = copy_log(torpor_home, "t2")
    assert _sparse(trig, log, "t2") == sparse
    assert _ask(trig, log, "ask", "t2") == answer
    final = lazy.wait_states(["t2"], timeout=60)["t2"]  # (the fixture kills a spinning daemon)
    assert final.state == "resident", final
    assert _ask(trig, log, "sum", "t2") == total
    # Its own THP flag came back from its image: the original ran with THP allowed.
    assert _thp_enabled(st.pid) == "1"
    torpor("stop", "t2")
