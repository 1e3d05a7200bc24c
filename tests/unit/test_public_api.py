"""The public facade: every exported name exists, is documented, and modules stay private."""

from __future__ import annotations

import subprocess
import sys

import torpor


def test_all_names_exist_and_are_documented() -> None:
    assert sorted(torpor.__all__) == torpor.__all__
    for name in torpor.__all__:
        obj = getattr(torpor, name)
        assert getattr(obj, "__doc__", None), f"torpor.{name} has no docstring"


def test_every_error_derives_from_the_root() -> None:
    for name in torpor.__all__:
        obj = getattr(torpor, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning):
            assert issubclass(obj, torpor.TorporError), name


def test_public_names_are_not_private_modules() -> None:
    import types

    public_modules = [
        n
        for n in dir(torpor)
        if not n.startswith("_") and isinstance(getattr(torpor, n), types.ModuleType)
    ]
    assert public_modules == [], public_modules


def test_lazy_names_resolve_to_the_real_objects() -> None:
    from torpor._coord import checkpoint
    from torpor._process._dump import checkpoint_pid

    assert torpor.checkpoint is checkpoint
    assert torpor.checkpoint_process is checkpoint_pid


def test_import_starts_no_thread_and_no_listener() -> None:
    code = "import threading, torpor; print(threading.active_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
