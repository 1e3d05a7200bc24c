"""The keeper's self-dump protocol and its pieces, without root or CRIU: request validation,
who the peer is, which staging directory and tree it may have dumped, the DUMP request the
keeper builds, the dumped process's side of the response, and sealing/publishing an image
relative to directory fds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from torpor._engine import DumpOptions, dump_request, receive_dump
from torpor._engine._rpc import Connection
from torpor._errors import (
    AlreadyExistsError,
    DumpError,
    ImageError,
    PermissionDeniedError,
    UnsafeImageError,
    UsageError,
)
from torpor._images import _image
from torpor._images._image import publish, seal
from torpor._images._incomplete import RECORD_NAME, RESERVE_NAME
from torpor._process._finalize import ImageFacts, Pending, finalize
from torpor._process._keeper_dump import (
    MAX_REQUEST,
    CollectRequest,
    DumpRequest,
    parse_request,
    receive,
    staging_problem,
)
from torpor._process._peer import Creds, Peer, parse_status, peer_of, read_creds, tree_problem
from torpor._proto import criu_rpc_pb2 as pb
from torpor._safe import SPARE_PREFIX, reserve_spares

GOOD = {
    "v": 1,
    "op": "self-dump",
    "staging": "/data/imgs/.web.partial-0a1b",
    "dest": "web",
    "name": "web",
    "labels": {"tier": "front"},
    "leave_running": True,
    "tcp_established": False,
}


def _req(**changes: object) -> bytes:
    msg = dict(GOOD)
    for key, value in changes.items():
        if value is ...:
            del msg[key]
        else:
            msg[key] = value
    return json.dumps(msg).encode()


# -- requests -----------------------------------------------------------------------------------


def test_sound_requests_parse() -> None:
    assert parse_request(_req()) == DumpRequest(
        staging="/data/imgs/.web.partial-0a1b",
        dest="web",
        name="web",
        leave_running=True,
        tcp_established=False,
        labels={"tier": "front"},
    )
    assert parse_request(b'{"v": 1, "op": "collect"}') == CollectRequest()


@pytest.mark.parametrize(
    ("packet", "error"),
    [
        (b"{", "malformed request: Expecting property name enclosed in double quotes: line 1 "
         "column 2 (char 1)"),
        (b"[1]", "malformed request: not a JSON object"),
        (_req(v=2), "request of protocol 2, this keeper speaks 1"),
        (_req(v=...), "request of protocol None, this keeper speaks 1"),
        (_req(op="dump"), "unknown request 'dump'"),
        (_req(pid=1), "malformed request: unknown field(s) pid"),
        (_req(images_dir="/", name=...), "malformed request: unknown field(s) images_dir; "
         "missing field(s) name"),
        (b'{"v": 1, "op": "collect", "pid": 1}', "malformed request: unknown field(s) pid"),
        (_req(staging="imgs/.web"), "staging 'imgs/.web' is not a normalised absolute path"),
        (_req(staging="/data/../etc/.x"), "staging '/data/../etc/.x' is not a normalised "
         "absolute path"),
        (_req(staging="/data//x"), "staging '/data//x' is not a normalised absolute path"),
        (_req(staging="/"), "staging '/' is not a normalised absolute path"),
        (_req(staging="/a/b\x00c"), "staging '/a/b\\x00c' is not a normalised absolute path"),
        (_req(staging="/" + "a" * 4096), f"staging '/{'a' * 4096}' is not a normalised "
         "absolute path"),
        (_req(staging=["/x"]), "staging ['/x'] is not a normalised absolute path"),
        (_req(dest="../web"), "dest '../web' is not a plain name beside the staging directory"),
        (_req(dest="/etc/cron.d"), "dest '/etc/cron.d' is not a plain name beside the staging "
         "directory"),
        (_req(dest=".web.partial-0a1b"), "dest '.web.partial-0a1b' is not a plain name beside "
         "the staging directory"),
        (_req(name="a/b"), "image name 'a/b' is not a plain name"),
        (_req(leave_running=1), "leave_running 1 is not a boolean"),
        (_req(tcp_established="yes"), "tcp_established 'yes' is not a boolean"),
        (_req(labels=[]), "labels must be an object of at most 64 strings"),
        (_req(labels={str(i): "" for i in range(65)}), "labels must be an object of at most "
         "64 strings"),
        (_req(labels={"k": 5}), "label 'k' is not a short string key with a string value"),
        (_req(labels={"": "v"}), "label '' is not a short string key with a string value"),
        (_req(labels={"k": "v" * 1025}), "label 'k' is not a short string key with a string "
         "value"),
    ],
)  # fmt: skip
def test_unsound_requests_are_refused_saying_why(packet: bytes, error: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_request(packet)
    assert str(exc.value) == error


def test_a_request_carrying_fds_is_refused_and_they_are_closed() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        fd = os.open(os.devnull, os.O_RDONLY)
        ours.sendmsg([_req()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))])
        os.close(fd)
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(PermissionDeniedError) as exc:
            receive(theirs)
        assert set(os.listdir("/proc/self/fd")) == before
    assert str(exc.value) == (
        "the request carried file descriptors; a keeper takes none and runs CRIU itself — the "
        "app runs an older torpor: upgrade it"
    )


def test_an_oversized_request_is_refused() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        ours.send(b" " * (MAX_REQUEST + 1))
        with pytest.raises(UsageError) as exc:
            receive(theirs)
        ours.send(_req())
        assert receive(theirs) == _req()
    assert str(exc.value) == f"request over {MAX_REQUEST} bytes; refused"


# -- the peer ---------------------------------------------------------------------------------

STATUS = "Name:\tapp\nUid:\t{u}\nGid:\t{g}\nGroups:\t{groups}\nCapPrm:\t{caps}\n"


def _creds(u: str, g: str, groups: str = "", caps: str = "0000000000000000") -> Creds:
    return parse_status(STATUS.format(u=u, g=g, groups=groups, caps=caps))


def test_status_credentials_are_read() -> None:
    assert _creds("1\t2\t3\t4", "5\t6\t7\t8", "10 20 ", "000001ffffffffff") == Creds(
        uids=(1, 2, 3, 4), gids=(5, 6, 7, 8), groups=(10, 20), cap_prm=0x1FFFFFFFFFF
    )
    with pytest.raises(ValueError, match="no 'CapPrm' in the status"):
        parse_status("Uid:\t1\t1\t1\t1\nGid:\t1\t1\t1\t1\nGroups:\t\n")
    with pytest.raises(ValueError, match="Uid/Gid lines without four values"):
        parse_status(STATUS.format(u="1 1", g="1 1 1 1", groups="", caps="0"))


def test_peer_is_root_if_any_uid_is_zero_else_one_user_or_refused() -> None:
    assert peer_of(7, 1000, 1000, _creds("1000 0 1000 1000", "1000 1000 1000 1000")) == Peer(
        7, 0, 0, (), 0
    )
    assert peer_of(7, 1000, 100, _creds("1000 1000 1000 1000", "100 100 100 100", "4")) == Peer(
        7, 1000, 100, (4,), 0
    )
    assert not Peer(7, 1000, 100, (), 0).privileged and Peer(7, 0, 0, (), 0).privileged
    with pytest.raises(PermissionDeniedError) as exc:
        peer_of(7, 1000, 100, _creds("1000 1000 1000 1000", "100 0 100 100"))
    assert str(exc.value) == (
        "process 7 has mixed credentials (uids 1000/1000/1000/1000, gids 100/0/100/100; "
        "connected as 1000:100); refused — drop privileges fully (setresgid, then setresuid) "
        "before asking its keeper"
    )
    with pytest.raises(PermissionDeniedError):  # changed uid since it connected
        peer_of(7, 1000, 100, _creds("1001 1001 1001 1001", "100 100 100 100"))


def _stat(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 2, uid, uid, 4096, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "problem"),
    [
        (stat.S_IFDIR | 0o700, 1000, None),
        (stat.S_IFDIR | 0o755, 1000, None),
        (stat.S_IFREG | 0o600, 1000, "is not a directory"),
        (stat.S_IFDIR | 0o700, 0, "is owned by uid 0, not by the requester (uid 1000)"),
        (stat.S_IFDIR | 0o770, 1000, "is writable by group or others (mode 0770)"),
        (stat.S_IFDIR | 0o1777, 1000, "is writable by group or others (mode 1777)"),
    ],
)
def test_staging_directory_must_be_one_the_peer_could_have_made(
    mode: int, uid: int, problem: str | None
) -> None:
    assert staging_problem(_stat(mode, uid), Peer(1, 1000, 1000, (), 0)) == problem


def test_tree_of_other_credentials_is_refused_and_own_tree_accepted() -> None:
    me = os.getpid()
    own = read_creds(f"/proc/{me}/status")
    other = Peer(me, 4242, 4242, (), 0)
    assert tree_problem(me, Peer(me, 0, 0, (), 0)) is None  # root: nothing to check
    ids = "/".join(str(u) for u in own.uids), "/".join(str(g) for g in own.gids)
    assert tree_problem(me, other) == (
        f"process {me} of its tree runs with other credentials (uids {ids[0]}, gids {ids[1]}) "
        "than uid 4242, gid 4242: its memory is not the requester's to have"
    )


# -- the CRIU request and its response --------------------------------------------------------


def test_the_keepers_dump_request_names_the_childs_tree_and_the_keepers_dir_fd() -> None:
    req = pb.Req()
    req.ParseFromString(dump_request(4321, 9, DumpOptions(leave_running=True, log_level=4)))
    assert (req.type, req.keep_open) == (pb.DUMP, False)
    o = req.opts
    assert (o.pid, o.images_dir_fd, o.HasField("images_dir")) == (4321, 9, False)
    assert (o.log_file, o.log_level, o.leave_running, o.notify_scripts) == (
        "criu-dump.log",
        4,
        True,
        False,
    )
    assert not o.HasField("root") and not o.tcp_established
    tcp = pb.Req()
    tcp.ParseFromString(dump_request(1, 3, DumpOptions(tcp_established=True)))
    assert (tcp.opts.tcp_established, tcp.opts.network_lock) == (True, pb.NFTABLES)


def _criu_answers(*responses: pb.Resp | None) -> tuple[Connection, threading.Thread]:
    """A Connection whose far end sends ``responses`` (None: hang up) without being asked."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def serve() -> None:
        with theirs:
            for resp in responses:
                if resp is None:
                    return
                theirs.send(resp.SerializeToString())

    t = threading.Thread(target=serve)
    t.start()
    return Connection(ours), t


def _settle(calls: list[str], kept: Path | None = None) -> Callable[[], Path | None]:
    def settle() -> Path | None:
        calls.append("settle")
        return kept

    return settle


def test_restored_copy_returns_without_settling(tmp_path: Path) -> None:
    conn, t = _criu_answers(pb.Resp(type=pb.DUMP, success=True, dump=pb.DumpResp(restored=True)))
    calls: list[str] = []
    result = receive_dump(conn, 5, tmp_path, settle=_settle(calls))
    t.join()
    assert (result.restored, calls) == (True, [])


def test_original_settles_before_returning(tmp_path: Path) -> None:
    conn, t = _criu_answers(pb.Resp(type=pb.DUMP, success=True, dump=pb.DumpResp()))
    calls: list[str] = []
    result = receive_dump(conn, 5, tmp_path, settle=_settle(calls))
    t.join()
    assert (result.restored, calls) == (False, ["settle"])


def test_failure_reads_the_log_once_settled_and_names_where_it_was_kept(tmp_path: Path) -> None:
    kept = tmp_path / "kept.log"
    conn, t = _criu_answers(pb.Resp(type=pb.DUMP, success=False, cr_errno=1))
    calls: list[str] = []

    def settle() -> Path:
        # The keeper hands the directory back only now: the log is readable from here on.
        (tmp_path / "criu-dump.log").write_text("(00.1) Error (criu/files.c:12): it broke\n")
        calls.append("settle")
        return kept

    with pytest.raises(DumpError) as exc:
        receive_dump(conn, os.getpid(), tmp_path, settle=settle)
    t.join()
    assert calls == ["settle"]
    assert str(exc.value) == (
        f"checkpoint of pid {os.getpid()} failed: files.c:12: it broke (the process keeps "
        f"running; log: {kept})"
    )


def test_criu_dying_is_a_dump_error_after_settling(tmp_path: Path) -> None:
    conn, t = _criu_answers(None)
    calls: list[str] = []
    with pytest.raises(DumpError) as exc:
        receive_dump(conn, 5, tmp_path, settle=_settle(calls))
    t.join()
    assert (calls, str(exc.value)) == (
        ["settle"],
        "checkpoint of pid 5 failed: CRIU ended without answering (CRIU closed the connection) "
        f"(the process keeps running; log: {tmp_path / 'criu-dump.log'})",
    )


# -- sealing and publishing relative to dir fds -------------------------------------------------

FACTS = ImageFacts(name="web", pid=7, cmdline=("app",), rss_bytes=10, criu_version="4.2.1")
RECORD = FACTS.record("web", start_time=1, leave_running=False, held_by_process=False)


def _staged(root: Path) -> Path:
    staging = root / ".web.partial-1"
    staging.mkdir(mode=0o700)
    for name in ("inventory.img", "pstree.img", "stats-dump", "criu-dump.log"):
        (staging / name).write_text(name)
        (staging / name).chmod(0o644)
    return staging


def test_seal_hashes_the_files_0600_and_publish_renames_beside(tmp_path: Path) -> None:
    staging = _staged(tmp_path)
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    d = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        manifest = seal(d, RECORD.manifest, source=str(staging)).manifest
        publish(parent, staging.name, "web", where=tmp_path, dir_fd=d)
    finally:
        os.close(d)
        os.close(parent)
    image = tmp_path / "web"
    assert [f.name for f in manifest.files] == ["inventory.img", "pstree.img", "stats-dump"]
    assert (manifest.name, manifest.pid, manifest.coordinated) == ("web", 7, True)
    assert json.loads((image / "torpor.json").read_text())["id"] == manifest.id
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in image.iterdir()}
    assert set(modes.values()) == {0o600} and "criu-dump.log" in modes


def test_seal_leaves_the_spares_alone_even_one_gone_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spares a checkpoint reserved are torpor's, not the image's (the seal writes its
    files into them): sealing does not fail when one goes between the listing and its use (a
    keeper's seal met that in CI: 'No such file or directory (.torpor-tmp-spare-1)')."""
    staging = _staged(tmp_path)
    d = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    reserve_spares(d, [4096] * 6, source=str(staging))  # more than the seal writes into
    listed = _image.lstat_entries

    def listing_then_a_spare_goes(dir_fd: int) -> dict[str, os.stat_result]:
        entries = listed(dir_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{SPARE_PREFIX}1", dir_fd=dir_fd)
        return entries

    monkeypatch.setattr(_image, "lstat_entries", listing_then_a_spare_goes)
    try:
        manifest = seal(d, RECORD.manifest, source=str(staging), owner=(65534, 65534)).manifest
    finally:
        os.close(d)
    assert [f.name for f in manifest.files] == ["inventory.img", "pstree.img", "stats-dump"]
    assert (staging / "pstree.img").stat().st_uid == 65534
    # What is left of torpor's spares is the owner's too (a kept staging dir is theirs).
    left = sorted(p.name for p in staging.iterdir() if p.name.startswith(SPARE_PREFIX))
    assert left != []
    assert {(staging / n).stat().st_uid for n in left} == {65534}


def test_seal_refuses_a_symlink_among_the_files(tmp_path: Path) -> None:
    staging = _staged(tmp_path)
    target = tmp_path / "target"
    target.write_text("keep")
    target.chmod(0o640)
    os.symlink(target, staging / "pages-1.img")
    d = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(UnsafeImageError) as exc:
            seal(d, RECORD.manifest, source=str(staging))
    finally:
        os.close(d)
    assert str(exc.value).startswith(
        f"staged image {staging} holds pages-1.img, a symlink, not a regular file; refused"
    )
    assert (target.read_text(), stat.S_IMODE(target.stat().st_mode)) == ("keep", 0o640)


def test_publish_never_replaces_what_is_at_the_destination(tmp_path: Path) -> None:
    staging = _staged(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "web")
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(AlreadyExistsError) as exc:
            publish(parent, staging.name, "web", where=tmp_path)
    finally:
        os.close(parent)
    assert str(exc.value) == (
        f"image directory {tmp_path / 'web'} appeared while checkpointing — the new image is "
        f"kept at {staging}"
    )
    assert os.readlink(tmp_path / "web") == str(elsewhere) and os.listdir(elsewhere) == []
    assert staging.is_dir()


def test_detached_finaliser_path_reads_a_checked_record(tmp_path: Path, torpor_home: Path) -> None:
    staging = _staged(tmp_path)
    d = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        Pending(dest="web", facts=FACTS, leave_running=False).write(d)
        with pytest.raises(FileExistsError):  # never written through what is there
            Pending(dest="web", facts=FACTS, leave_running=False).write(d)
    finally:
        os.close(d)
    assert {RECORD_NAME, RESERVE_NAME} <= set(os.listdir(staging))
    assert finalize(staging) == tmp_path / "web"
    assert set(os.listdir(tmp_path / "web")) & {RECORD_NAME, RESERVE_NAME} == set()
    assert json.loads((tmp_path / "web" / "torpor.json").read_text())["name"] == "web"


@pytest.mark.parametrize(
    "change", [{"dest": "../web"}, {"dest": "/etc/x"}, {"pid": "7"}, {"labels": {"a": 1}}]
)
def test_detached_finaliser_refuses_a_record_a_self_dump_did_not_write(
    tmp_path: Path, change: dict[str, object]
) -> None:
    staging = _staged(tmp_path)
    record = {**FACTS.__dict__, "cmdline": ["app"], "labels": {}, "dest": "web"}
    record.update(leave_running=False, start_time=1, shell_job=False, created="now", **change)
    (staging / RECORD_NAME).write_text(json.dumps(record))
    with pytest.raises(ImageError) as exc:
        finalize(staging)
    assert str(exc.value) == f"{staging}: {RECORD_NAME} is not a checkpoint's record"
    assert sorted(os.listdir(tmp_path)) == [staging.name]
