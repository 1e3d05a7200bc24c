"""What every fuzz property shares: the verdict (a TorporError or success, nothing else), a hard
per-example time bound, a jail that proves nothing was written outside torpor's home, and
strategies for hostile input (random bytes, JSON with hostile values, names that escape).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

from hypothesis import settings
from hypothesis import strategies as st

from torpor import TorporError

T = TypeVar("T")

# -- verdicts ---------------------------------------------------------------------------------


def verdict(fn: Callable[[], T]) -> T | TorporError:
    """Run ``fn``: its result, or the :class:`TorporError` it raised (checked to be one
    line). Any other exception propagates: that is the property failing."""
    try:
        return fn()
    except TorporError as exc:
        _one_line(exc)
        return exc


def _one_line(exc: TorporError) -> None:
    # A TorporError is shown to the user as it is: one line, never empty.
    text = str(exc)
    assert text and "\n" not in text, f"{type(exc).__name__} message is not one line: {text!r}"


class Hang(AssertionError):
    """An example ran past its time bound: the property failed (an ``Exception``, so that
    Hypothesis shrinks and reports it)."""


class _Alarm(BaseException):
    # Raised inside the code under test: a BaseException, so no ``except Exception`` there
    # swallows it; :func:`bounded` turns it into :class:`Hang`.
    pass


@contextlib.contextmanager
def bounded(seconds: float = 2.0) -> Iterator[None]:
    """Fail the example with :class:`Hang` if it runs longer than ``seconds`` (SIGALRM: it
    interrupts a blocking system call too, such as an ``open`` of a FIFO). Only for code that
    runs in this thread; see :func:`in_child` for the rest."""

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise _Alarm

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Alarm:
        raise Hang(f"example still running after {seconds} s: a hang") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_child_errors: dict[str, type[AssertionError]] = {}
# Characters of a child's message and traceback sent back: even JSON-escaped (6 bytes a
# character at most) they fit a pipe's 64 KiB, which the parent reads once the child exited.
_REPORT = 4096


def _child_error(name: str) -> type[AssertionError]:
    # One class per exception type, so Hypothesis tells distinct failures apart.
    if name not in _child_errors:
        _child_errors[name] = type(f"InChild{name}", (AssertionError,), {})
    return _child_errors[name]


def in_child(
    fn: Callable[[], object],
    *,
    also: tuple[type[BaseException], ...] = (),
    seconds: float = 10.0,
) -> dict[str, str]:
    """Run ``fn`` in a forked child and return how it ended: ``{"kind": "ok"}`` or
    ``{"kind": "error", "type": ..., "msg": ...}`` for a :class:`TorporError` (or ``also``).

    Anything else it raises, or running past ``seconds`` (the child is then killed, by pid),
    fails the example here. A child is used where a hang would otherwise outlive the example
    (a thread stuck reading ``/dev/zero`` keeps the interpreter from exiting) and where the
    code under test changes process state (umask, rlimits, environment).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            try:
                fn()
                out: dict[str, str] = {"kind": "ok"}
            except TorporError as exc:
                out = {"kind": "error", "type": type(exc).__name__, "msg": str(exc)[:_REPORT]}
            except also as exc:
                out = {"kind": "error", "type": type(exc).__name__, "msg": str(exc)[:_REPORT]}
            except BaseException as exc:
                import traceback

                out = {
                    "kind": "other",
                    "type": type(exc).__name__,
                    "msg": str(exc)[:_REPORT],
                    "tb": traceback.format_exc()[-_REPORT:],
                }
            os.write(w, json.dumps(out).encode())
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(w)
    pidfd = os.pidfd_open(pid)
    try:
        import select

        ready, _, _ = select.select([pidfd], [], [], seconds)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as fh:
            data = fh.read()
    finally:
        os.close(pidfd)
    if not ready:
        raise Hang(f"example still running after {seconds} s in a child: a hang")
    if not data:
        raise AssertionError("the child died without reporting")
    out = json.loads(data)
    if out["kind"] == "other":
        raise _child_error(out["type"])(f"{out['type']}: {out['msg']}\n{out['tb']}")
    if out["kind"] == "error" and out["type"] not in {e.__name__ for e in also}:
        assert out["msg"] and "\n" not in out["msg"], f"message is not one line: {out['msg']!r}"
    return out


def scaled(fraction: float, **kwargs: Any) -> settings:
    """Settings for an expensive property: ``fraction`` of the profile's examples (at least
    5), the rest of the profile unchanged."""
    n = max(5, int(settings.default.max_examples * fraction))
    return settings(settings.default, max_examples=n, **kwargs)


# -- the jail -----------------------------------------------------------------------------------

EVIL = "torpor-fuzz-evil"
"""Every escaping name the strategies make ends in this, so a file that escaped is found by
name wherever it landed."""
OUT = "@OUT@"
"""Stands for the jail's ``outside`` directory in generated strings (see :meth:`Jail.fill`)."""
DEPTH = 16
"""How deep the home sits in the jail: deeper than any ``../`` chain the strategies make
(:data:`MAX_UP`) climbs from anywhere in the home, so an escape lands inside the jail."""
MAX_UP = 12
JAILS = Path(tempfile.gettempdir()) / f"torpor-fuzz-{os.getpid()}"
"""Where the jails of this run are made (removed at the end of the session)."""


def _tree(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` (the trees in ``skip`` excepted) with its type, size and
    mtime."""
    out: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            p = here / name
            st_ = p.lstat()
            out[str(p.relative_to(root))] = (stat.S_IFMT(st_.st_mode), st_.st_size, st_.st_mtime_ns)
    return out


def _evil_around(root: Path) -> list[Path]:
    """Escaped files in the directories above the jail (where ``../`` chains and absolute names
    would land), by name."""
    found: list[Path] = []
    for parent in root.parents:
        with contextlib.suppress(OSError):
            found += [parent / n for n in os.listdir(parent) if EVIL in n]
    return found


def fill(value: Any, outside: str = "/torpor-fuzz-out") -> Any:
    """``value`` with :data:`OUT` replaced by ``outside`` in every string (keys too)."""
    if isinstance(value, str):
        return value.replace(OUT, outside)
    if isinstance(value, bytes):
        return value.replace(OUT.encode(), os.fsencode(outside))
    if isinstance(value, list):
        return [fill(v, outside) for v in value]
    if isinstance(value, dict):
        return {fill(k, outside): fill(v, outside) for k, v in value.items()}
    return value


class Jail:
    """A fresh directory tree for one example: ``TORPOR_HOME`` deep inside it, a sentinel
    ``outside`` directory beside, the cwd in ``cwd/``. On leaving, every change in the jail
    outside the home (and ``outside``, if ``outside_allowed``), and any file named with
    :data:`EVIL` above the jail, fails the example.

    Input files the example prepares go to :attr:`inputs` *before* entering (or are ignored:
    the tree is snapshotted on entry)."""

    def __init__(self, *, outside_allowed: bool = False) -> None:
        JAILS.mkdir(mode=0o700, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="jail-", dir=JAILS))
        self.home = self.root.joinpath(*(f"d{i}" for i in range(DEPTH)), "home")
        self.outside = self.root / "outside"
        self.inputs = self.root / "inputs"
        self.cwd = self.root / "cwd"
        for d in (self.home, self.outside, self.inputs, self.cwd):
            d.mkdir(mode=0o700, parents=True)
        (self.outside / "sentinel").write_text("untouched")
        # Where writes are expected: the home, and ``outside`` when a test points torpor at
        # it on purpose (a pool's configured source).
        self._skip = (self.home, self.outside) if outside_allowed else (self.home,)
        self._saved: tuple[str | None, str] | None = None
        self._before: dict[str, tuple[int, int, int]] = {}

    def fill(self, value: Any) -> Any:
        """``value`` with :data:`OUT` replaced by the ``outside`` directory in every string."""
        return fill(value, str(self.outside))

    def __enter__(self) -> Jail:
        self._saved = (os.environ.get("TORPOR_HOME"), os.getcwd())
        os.environ["TORPOR_HOME"] = str(self.home)
        os.chdir(self.cwd)
        self._before = _tree(self.root, self._skip)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._saved is not None
        env, cwd = self._saved
        os.chdir(cwd)
        if env is None:
            os.environ.pop("TORPOR_HOME", None)
        else:
            os.environ["TORPOR_HOME"] = env
        try:
            after = _tree(self.root, self._skip)
            changed = sorted(
                k for k in set(self._before) | set(after) if self._before.get(k) != after.get(k)
            )
            escaped = _evil_around(self.root)
            for p in escaped:  # never leave them behind, even on a failure
                with contextlib.suppress(OSError):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
        problems = [f"written outside torpor's home: {p}" for p in [*changed, *map(str, escaped)]]
        if exc is not None:
            for problem in problems:  # shown with the example's own failure
                exc.add_note(problem)
        else:
            assert not problems, "; ".join(map(str, problems))


# -- strategies ---------------------------------------------------------------------------------

PLAIN_NAMES = st.sampled_from(
    ["pages-1.img", "core-1.img", "mm-1.img", "inventory.img", "x", "a.b", "torpor.json"]
)


@st.composite
def escaping_names(draw: st.DrawFn) -> str:
    """A name that, used as a path, lands outside where it is used (and ends in EVIL)."""
    tag = f"{EVIL}-{draw(st.integers(0, 9))}"
    kind = draw(st.sampled_from(["up", "abs", "nested", "dot-up"]))
    if kind == "up":
        return "../" * draw(st.integers(1, MAX_UP)) + tag
    if kind == "abs":
        return f"{OUT}/{tag}"
    if kind == "nested":
        return f"x/{'../' * draw(st.integers(2, MAX_UP))}{tag}"
    return "./" + "../" * draw(st.integers(1, MAX_UP)) + tag


BAD_NAMES = st.sampled_from(
    [
        "",
        ".",
        "..",
        "/",
        "a/b",
        "a\\b",
        "x\x00y",
        "x\ny",
        "\x7f",
        "\ud800",
        "é" * 200,
        "x" * 256,
        " ",
        "-rf",
        "torpor.json",
        ".torpor-verified.json",
        "...",
    ]
)

HOSTILE_NAMES = st.one_of(escaping_names(), BAD_NAMES, PLAIN_NAMES, st.text(max_size=20))

HOSTILE_INTS = st.one_of(
    st.sampled_from([-(2**63) - 1, -(2**63), -1, 0, 1, 4095, 4096, 2**31, 2**63 - 1, 2**63, 2**64]),
    st.integers(),
)

HOSTILE_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    HOSTILE_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    HOSTILE_NAMES,
    st.text(max_size=40),
)

JSON_VALUES = st.recursive(
    HOSTILE_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

DEEP_JSON = [b"[" * 10_000 + b"]" * 10_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000]
"""Nesting ten times deeper than the interpreter's recursion limit, in under 64 KiB (one
packet of the socket protocols)."""


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replaced(value: Any, path: tuple[Any, ...], new: Any, delete: bool) -> Any:
    """A copy of ``value`` with the item at ``path`` set to ``new`` (or deleted)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    out: Any = dict(value) if isinstance(value, dict) else list(value)
    if rest:
        out[head] = _replaced(value[head], rest, new, delete)
    elif delete:
        del out[head]
    else:
        out[head] = new
    return out


@st.composite
def mutated_json(draw: st.DrawFn, base: Any, *, max_mutations: int = 3) -> Any:
    """``base`` (a valid document) with 1 to ``max_mutations`` structured changes: a value
    replaced by a hostile one, a key deleted, an unknown key added."""
    doc = base
    for _ in range(draw(st.integers(1, max_mutations))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if op == "delete" and path:
            doc = _replaced(doc, path, None, True)
        elif op == "add":
            parent = path if path else ()
            target: Any = doc
            for p in parent:
                target = target[p]
            if isinstance(target, dict):
                doc = _replaced(doc, (*parent, draw(st.text(max_size=8))), draw(JSON_VALUES), False)
            else:
                doc = _replaced(doc, path, draw(JSON_VALUES), False)
        else:
            doc = _replaced(doc, path, draw(JSON_VALUES), False)
    return doc


def dumps(value: Any) -> bytes:
    """JSON as a hostile writer might send it (NaN allowed, lone surrogates escaped)."""
    return json.dumps(value).encode()


# -- a small valid image ------------------------------------------------------------------------

IMAGE_FILES = {
    "inventory.img": b"inv",
    "pstree.img": b"pstree" * 10,
    "core-1.img": b"core" * 300,
    "mm-1.img": bytes(range(256)) * 20,
    # Two chunk lists' worth of pages (a long list lives in a list object, a short one inline),
    # zero pages among them (stored as holes).
    "pages-1.img": b"".join(
        (bytes(4096) if i % 5 == 0 else bytes([i % 251]) * 4096) for i in range(80)
    ),
}


def make_image(root: Path, name: str = "web") -> Any:
    """A committed image directory shaped like CRIU's under ``root``."""
    from torpor._images import _manifest
    from torpor._images._image import staging

    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with staging(root / name) as st_:
        for fname, data in IMAGE_FILES.items():
            (st_.path / fname).write_bytes(data)
        return st_.commit(
            lambda entries: _manifest.build(
                name=name,
                pid=4242,
                files=entries,
                criu_version="4.2.1",
                cmdline=("python3", "app.py"),
                rss_bytes=len(IMAGE_FILES["pages-1.img"]),
            )
        )
