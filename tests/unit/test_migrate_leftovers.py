"""The source's journal of what a migration must undo after its commit
(``torpor._migrate._leftovers``): written before the commit, settled by its command, swept
once that command is gone. Real journals in a real home and real processes (the original, the
command that owns the journal); nftables and the host's addresses are fakes here (the lab test
``tests/migration/test_migrate_faults.py`` runs the real ones)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor._migrate import _address, _leftovers, _netlock
from torpor._migrate._address import AddressError, IPAddr
from torpor._process import _registry
from torpor._process._proc import ProcRef, start_time

TABLE = ("inet", "CRIU-1234-abcd")
ADDR = "10.0.0.100/24"


class FakeNft:
    """``nft`` with a set of tables: ``list tables`` and ``delete table`` only."""

    def __init__(self, tables: list[tuple[str, str]]) -> None:
        self.tables = list(tables)
        self.deleted: list[tuple[str, str]] = []
        self.fail = False

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        if args == ("-j", "list", "tables"):
            items = [{"table": {"family": f, "name": n, "handle": 1}} for f, n in self.tables]
            return json.dumps({"nftables": items})
        assert args[:2] == ("delete", "table"), args
        if self.fail:
            raise _netlock.NetlockError("nft delete table failed: Operation not permitted")
        self.tables.remove((args[2], args[3]))
        self.deleted.append((args[2], args[3]))
        return ""


class FakeHost:
    """The host's addresses, for ``_address.take_down``."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = set(addresses)
        self.removed: list[str] = []
        self.fail = False

    def take_down(self, addr: IPAddr) -> bool:
        if self.fail:
            raise AddressError(f"ip addr del {addr} dev eth0 failed: RTNETLINK answers: busy")
        if str(addr) not in self.addresses:
            return False
        self.addresses.remove(str(addr))
        self.removed.append(str(addr))
        return True


@pytest.fixture
def nft(monkeypatch: pytest.MonkeyPatch) -> FakeNft:
    fake = FakeNft([("inet", "filter"), TABLE])
    monkeypatch.setattr(_netlock, "_nft", fake)
    return fake


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    fake = FakeHost([ADDR, "10.0.0.1/24"])
    monkeypatch.setattr(_address, "take_down", fake.take_down)
    return fake


@pytest.fixture
def home(torpor_home: Path, nft: FakeNft, host: FakeHost) -> Path:
    return torpor_home


class Procs:
    """Processes a test starts (killed by pid at its end)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *cmd: str) -> tuple[subprocess.Popen[bytes], ProcRef]:
        proc = subprocess.Popen(cmd or ("sleep", "60"), stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        deadline = time.monotonic() + 5
        while (born := start_time(proc.pid)) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return proc, ProcRef(proc.pid, born)

    def end(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    for proc in p.procs:
        p.end(proc)


def gone(procs: Procs) -> ProcRef:
    """The identity of a process that has ended (the original CRIU killed)."""
    proc, ref = procs.start()
    procs.end(proc)
    return ref


# Writes a journal and exits: a command killed (or ended) after noting its leftovers.
WRITER = """
import json, sys
from torpor._migrate import _address, _leftovers
from torpor._process._proc import ProcRef
pid, born, tables, addrs = int(sys.argv[1]), int(sys.argv[2]), *map(json.loads, sys.argv[3:])
path = _leftovers.record("web", ProcRef(pid, born), target="10.0.0.3:7070",
                         tables=[tuple(t) for t in tables],
                         addresses=_address.parse_all(addrs))
print(path)
"""


def written_by_a_dead_command(original: ProcRef) -> Path:
    """A journal of :data:`TABLE` and :data:`ADDR`, by a command that has ended."""
    res = subprocess.run(
        [sys.executable, "-c", WRITER, str(original.pid), str(original.start_time),
         json.dumps([TABLE]), json.dumps([ADDR])],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return Path(res.stdout.strip())


def record(original: ProcRef, **kw: Any) -> Path:
    path = _leftovers.record(
        "web",
        original,
        target="10.0.0.3:7070",
        tables=kw.get("tables", [TABLE]),
        addresses=_address.parse_all(kw.get("addresses", [ADDR])),
    )
    assert path is not None
    return path


def test_record_writes_one_private_journal_naming_everything(home: Path, procs: Procs) -> None:
    _, original = procs.start()
    path = record(original)
    assert path.parent == home / "migrate-undo"
    assert (os.stat(path.parent).st_mode & 0o777, os.stat(path).st_mode & 0o777) == (0o700, 0o600)
    assert os.listdir(path.parent) == [path.name]  # no temporary file left
    journal = _leftovers.load(path)
    assert (journal.name, journal.target, journal.original) == ("web", "10.0.0.3:7070", original)
    assert journal.owner == ProcRef(os.getpid(), start_time(os.getpid()) or -1)
    assert journal.tables == (TABLE,)
    assert [str(a) for a in journal.addresses] == [ADDR]


def test_record_has_nothing_to_note_without_tables_or_addresses(home: Path, procs: Procs) -> None:
    _, original = procs.start()
    assert _leftovers.record("web", original, target="t:1", tables=[], addresses=()) is None
    assert not (home / "migrate-undo").exists() or os.listdir(home / "migrate-undo") == []


def test_record_refuses_a_table_that_is_not_criu_s_lock(home: Path, procs: Procs) -> None:
    _, original = procs.start()
    with pytest.raises(_leftovers.JournalError, match="not CRIU lock tables: filter"):
        _leftovers.record("web", original, target="t:1", tables=[("inet", "filter")], addresses=())


def test_sweep_removes_what_a_killed_command_left_once_the_original_is_gone(
    home: Path, procs: Procs, nft: FakeNft, host: FakeHost
) -> None:
    path = written_by_a_dead_command(gone(procs))
    lines = _leftovers.sweep()
    assert lines == [
        f"removed {ADDR}, left here by the migration of web (migrated to 10.0.0.3:7070)",
        "removed CRIU's network lock inet CRIU-1234-abcd, left by web (migrated to 10.0.0.3:7070)",
    ]
    # Only those: the host's own address and the other table stay.
    assert (host.removed, host.addresses) == ([ADDR], {"10.0.0.1/24"})
    assert (nft.deleted, nft.tables) == ([TABLE], [("inet", "filter")])
    assert not path.exists()
    assert _leftovers.sweep() == []  # once


def test_sweep_leaves_a_migration_whose_command_runs(
    home: Path, procs: Procs, nft: FakeNft, host: FakeHost
) -> None:
    path = record(gone(procs))  # owned by this very process, which runs
    assert _leftovers.sweep() == []
    assert path.exists() and host.removed == [] and nft.deleted == []
    assert _leftovers.settle(path) == [
        f"removed {ADDR}, left here by the migration of web (migrated to 10.0.0.3:7070)",
        "removed CRIU's network lock inet CRIU-1234-abcd, left by web (migrated to 10.0.0.3:7070)",
    ]
    assert not path.exists()


def test_a_rolled_back_migration_leaves_the_original_its_address(
    home: Path, procs: Procs, nft: FakeNft, host: FakeHost
) -> None:
    """The original runs (CRIU thawed it, untraced): the journal goes, nothing else."""
    _, original = procs.start()
    path = written_by_a_dead_command(original)
    assert _leftovers.sweep() == []
    assert not path.exists()
    assert host.removed == [] and nft.deleted == []


TRACED = """
import ctypes, time
ctypes.CDLL(None, use_errno=True).ptrace(0, 0, None, None)  # PTRACE_TRACEME: the test traces it
print("traced", flush=True)
time.sleep(60)
"""


def test_an_original_still_held_by_criu_is_left_for_a_later_sweep(
    home: Path, procs: Procs, nft: FakeNft, host: FakeHost
) -> None:
    """Traced (CRIU between the answer and the kill): nothing is touched, the journal stays;
    once it is gone, the next sweep undoes it."""
    proc, original = procs.start(sys.executable, "-c", TRACED)
    deadline = time.monotonic() + 10
    while not _leftovers._traced(proc.pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    path = written_by_a_dead_command(original)
    assert _leftovers.sweep() == []
    assert path.exists() and host.removed == [] and nft.deleted == []
    procs.end(proc)  # as CRIU's kill
    assert len(_leftovers.sweep()) == 2
    assert not path.exists() and host.removed == [ADDR] and nft.deleted == [TABLE]


def test_an_address_a_running_managed_process_holds_stays(
    home: Path, procs: Procs, host: FakeHost, nft: FakeNft
) -> None:
    """The process came back (migrated here again, with its address): the address is its."""
    path = written_by_a_dead_command(gone(procs))
    _, back = procs.start()
    _registry.save(
        _registry.ManagedProcess(
            name="web", pid=back.pid, start_time=back.start_time, keeper_pid=os.getpid(),
            command=("sleep", "60"), started="2026-01-01T00:00:00", service_addresses=(ADDR,),
        )
    )  # fmt: skip
    assert _leftovers.sweep() == [
        "removed CRIU's network lock inet CRIU-1234-abcd, left by web (migrated to 10.0.0.3:7070)"
    ]
    assert host.removed == [] and ADDR in host.addresses
    assert not path.exists()


def test_what_cannot_be_undone_keeps_the_journal_for_the_next_sweep(
    home: Path, procs: Procs, nft: FakeNft, host: FakeHost
) -> None:
    path = written_by_a_dead_command(gone(procs))
    host.fail = nft.fail = True
    assert _leftovers.sweep() == [
        f"warning: {ADDR} could not be removed here: ip addr del {ADDR} dev eth0 failed: "
        "RTNETLINK answers: busy",
        "warning: CRIU's network lock CRIU-1234-abcd is left here: nft delete table failed: "
        "Operation not permitted",
    ]
    assert path.exists()
    host.fail = nft.fail = False
    assert len(_leftovers.sweep()) == 2
    assert not path.exists() and host.removed == [ADDR] and nft.deleted == [TABLE]


def test_a_journal_of_another_boot_is_dropped_untouched(
    home: Path, procs: Procs, nft: FakeNft, host: FakeHost
) -> None:
    path = written_by_a_dead_command(gone(procs))
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "boot_id": "00000000-0000-0000-0000-000000000000"}))
    assert _leftovers.sweep() == []
    assert not path.exists() and host.removed == [] and nft.deleted == []


def planted(home: Path, procs: Procs, **changes: Any) -> Path:
    """A journal as a killed command writes it, with ``changes`` to its fields."""
    path = written_by_a_dead_command(gone(procs))
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))
    return path


HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "a firewall table": ({"tables": ["filter"]}, "it names a table that is not CRIU's lock"),
    "a table path": ({"tables": ["CRIU-1/../x"]}, "it names a table that is not CRIU's lock"),
    "many tables": ({"tables": ["CRIU-1"] * 9}, "its tables are not a short list"),
    "a default route": ({"addresses": ["0.0.0.0/0"]}, "service address 0.0.0.0/0 is unspecified"),
    "a host's own single address": (
        {"addresses": ["10.0.0.1/32"]},
        "service address 10.0.0.1/32 is a single address, not one within a subnet",
    ),
    "a boolean pid": ({"original": [True, 5]}, "its original is not [pid, start time]"),
    "a pid out of range": ({"owner": [1 << 40, 5]}, "its owner is not [pid, start time]"),
    "a path as name": ({"name": "../procs/web"}, "its name is not a process name"),
    "a target with a newline": ({"target": "a\nb"}, "its target is not HOST:PORT"),
    "another version": ({"version": 2}, "it is not a version 1 journal"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_journal_is_refused_and_removed_untouched(
    home: Path, procs: Procs, nft: FakeNft, host: FakeHost, case: str
) -> None:
    changes, problem = HOSTILE[case]
    path = planted(home, procs, **changes)
    lines = _leftovers.sweep()
    assert len(lines) == 1 and lines[0].startswith(f"removed {path}: ")
    assert problem in lines[0]
    assert lines[0].endswith("(its leftovers, if any, are not known)")
    assert not path.exists()
    assert host.removed == [] and nft.deleted == [] and nft.tables == [("inet", "filter"), TABLE]


def test_journals_that_are_not_regular_private_files_are_refused(
    home: Path, procs: Procs, nft: FakeNft, host: FakeHost, tmp_path: Path
) -> None:
    good = written_by_a_dead_command(gone(procs))
    directory = good.parent
    target = tmp_path / "elsewhere.json"
    target.write_text(good.read_text())
    os.unlink(good)
    (directory / "0000000000000001.json").symlink_to(target)  # a planted symlink
    os.mkfifo(directory / "0000000000000002.json")  # would hang a plain open
    big = directory / "0000000000000003.json"
    big.write_text(" " * (_leftovers.MAX_JOURNAL + 1))
    loose = directory / "0000000000000004.json"
    loose.write_text(target.read_text())
    loose.chmod(0o620)  # writable by its group
    (directory / "not-a-journal.json").write_text(target.read_text())
    lines = _leftovers.sweep()
    assert [line.split(": ", 1)[1] for line in lines] == [
        f"{directory}: file 0000000000000001.json is a symlink, not a regular file; refused"
        " — an image holds only regular files: do not use this one (its leftovers, if any, "
        "are not known)",
        f"{directory}: file 0000000000000002.json is a FIFO, not a regular file; refused"
        " — an image holds only regular files: do not use this one (its leftovers, if any, "
        "are not known)",
        f"it is longer than {_leftovers.MAX_JOURNAL} bytes (its leftovers, if any, are not known)",
        "it is writable by group or others (mode 0620) (its leftovers, if any, are not known)",
        "'not-a-journal.json' is not the name of a journal (its leftovers, if any, are not known)",
    ]
    assert os.listdir(directory) == []
    assert target.exists()  # the symlink went, not what it pointed to
    assert host.removed == [] and nft.deleted == []


def test_a_killed_writer_s_temporary_file_goes_once_it_is_old(home: Path, procs: Procs) -> None:
    _, original = procs.start()
    directory = record(original).parent
    temp = directory / ".torpor-tmp-1-abcd"
    temp.write_text("{")
    assert _leftovers.sweep() == []
    assert temp.exists()  # it may be a moment from its rename
    old = time.time() - _leftovers.TEMP_GRACE - 1
    os.utime(temp, (old, old))
    _leftovers.sweep()
    assert not temp.exists()


# -- addresses this host's server has just brought up for an incoming copy ---------------------

INFLIGHT = "migrate-inflight.json"


def test_an_address_the_server_brought_up_for_an_incoming_copy_stays(
    home: Path, procs: Procs, host: FakeHost, nft: FakeNft, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process comes back here (migrated in, the server restoring it, not recorded yet)
    while a stale journal of its earlier move away names the same address: a sweep then
    (``torpor ps``) must not take it down under the incoming copy."""
    from torpor._migrate import _serve

    path = written_by_a_dead_command(gone(procs))

    def block(tag: str, addrs: object, criu: str | None = None) -> tuple[str, str]:
        nft.tables.append(("inet", f"torpor-mig-{tag}"))
        return ("inet", f"torpor-mig-{tag}")

    monkeypatch.setattr(_netlock, "block", block)
    monkeypatch.setattr(_address, "bring_up", lambda addr, links=None: None)
    monkeypatch.setattr(_address, "announce", lambda addr, link=None: True)
    conn: Any = type("Conn", (), {"peer": type("Peer", (), {"name": "a"})()})()
    incoming: Any = _serve._Incoming(conn, "b:7070", lambda line: None)
    incoming.addresses = _address.parse_all([ADDR])
    swept: list[str] = []

    def restore() -> Any:
        journal = json.loads((home / INFLIGHT).read_text())
        assert journal["owner"] == [os.getpid(), start_time(os.getpid())]  # this server
        swept.extend(_leftovers.sweep())  # as `torpor ps` on this host, meanwhile
        return "rec"

    assert incoming.with_addresses(restore) == "rec"
    assert swept == [
        "removed CRIU's network lock inet CRIU-1234-abcd, left by web (migrated to 10.0.0.3:7070)"
    ]
    assert host.removed == [] and ADDR in host.addresses
    assert not path.exists() and not (home / INFLIGHT).exists()


def inflight(home: Path, data: object) -> None:
    (home / INFLIGHT).write_text(json.dumps(data))
    (home / INFLIGHT).chmod(0o600)


def test_a_journal_of_a_server_that_ended_holds_nothing(
    home: Path, procs: Procs, host: FakeHost, nft: FakeNft
) -> None:
    path = written_by_a_dead_command(gone(procs))
    dead = gone(procs)
    inflight(home, {"addresses": [ADDR], "lock": None, "owner": [dead.pid, dead.start_time]})
    _leftovers.sweep()
    assert host.removed == [ADDR] and not path.exists()


@pytest.mark.parametrize(
    "data",
    [
        "not json{",
        [ADDR],
        {"addresses": ADDR},
        {"addresses": [ADDR], "owner": "me"},
        {"addresses": [ADDR], "owner": [True, 1]},
        {"addresses": [ADDR], "owner": [0, 1]},
        {"addresses": [ADDR], "owner": [1 << 40, 1]},
        {"addresses": [ADDR], "owner": [1, 2, 3]},
    ],
    ids=["text", "list", "addresses-str", "owner-str", "owner-bool", "pid-0", "pid-huge", "three"],
)
def test_a_hostile_server_journal_holds_nothing(
    home: Path, procs: Procs, host: FakeHost, nft: FakeNft, data: object
) -> None:
    written_by_a_dead_command(gone(procs))
    if isinstance(data, str):
        (home / INFLIGHT).write_text(data)
    else:
        inflight(home, data)
    _leftovers.sweep()
    assert host.removed == [ADDR]


def test_a_server_journal_that_is_not_torpor_s_file_holds_nothing(
    home: Path, procs: Procs, host: FakeHost, nft: FakeNft, tmp_path: Path
) -> None:
    written_by_a_dead_command(gone(procs))
    _, server = procs.start()
    elsewhere = tmp_path / "planted.json"
    elsewhere.write_text(
        json.dumps({"addresses": [ADDR], "owner": [server.pid, server.start_time]})
    )
    (home / INFLIGHT).symlink_to(elsewhere)
    _leftovers.sweep()
    assert host.removed == [ADDR]


def test_a_live_server_s_journal_holds_its_good_addresses(
    home: Path, procs: Procs, host: FakeHost, nft: FakeNft
) -> None:
    written_by_a_dead_command(gone(procs))
    _, server = procs.start()
    owner = [server.pid, server.start_time]
    inflight(home, {"addresses": [7, "nonsense", ADDR], "owner": owner})
    _leftovers.sweep()
    assert host.removed == [] and ADDR in host.addresses


def test_the_incoming_copy_s_record_holds_its_addresses_before_the_journal_goes(
    home: Path, procs: Procs, host: FakeHost, nft: FakeNft, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copy (and pool) mode: the record naming the copy's service addresses is written while
    the server's journal still holds them, never after it went (a sweep in between would
    take them down under the copy)."""
    from torpor._migrate import _serve
    from torpor._migrate._channel import ChannelError

    def block(tag: str, addrs: object, criu: str | None = None) -> tuple[str, str]:
        nft.tables.append(("inet", f"torpor-mig-{tag}"))
        return ("inet", f"torpor-mig-{tag}")

    monkeypatch.setattr(_netlock, "block", block)
    monkeypatch.setattr(_address, "bring_up", lambda addr, links=None: None)
    monkeypatch.setattr(_address, "announce", lambda addr, link=None: True)
    _, copy = procs.start()
    rec = _registry.ManagedProcess(
        name="web", pid=copy.pid, start_time=copy.start_time, keeper_pid=os.getpid(),
        command=("sleep", "60"), started="2026-01-01T00:00:00",
    )  # fmt: skip
    monkeypatch.setattr(_serve, "_restore_apart", lambda image, name, stopped=False: rec)
    journal_there: list[bool] = []

    def update(name: str, ref: ProcRef, **changes: Any) -> bool:
        if "service_addresses" in changes:
            journal_there.append((home / INFLIGHT).exists())
        return True

    monkeypatch.setattr(_registry, "update", update)

    class Conn:
        peer = type("Peer", (), {"name": "a"})()

        def send(self, msg: dict[str, Any]) -> None:
            raise ChannelError("cut")  # the 'running': the copy is abandoned

    incoming: Any = _serve._Incoming(Conn(), "b:7070", lambda line: None)  # type: ignore[arg-type]
    incoming.addresses = _address.parse_all([ADDR])
    monkeypatch.setattr(incoming, "abandon", lambda r: None)
    incoming._restore(None, "web")
    assert journal_there == [True]
    assert not (home / INFLIGHT).exists()
