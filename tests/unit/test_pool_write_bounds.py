"""Writers are held to the readers' bounds: a push, copy, import or export refuses, before it
stores anything, an image torpor's own readers would then refuse (a chunk list over MAX_LIST,
a file over MAX_FILE_SIZE, a manifest over MAX_RECORD, an archive member over MAX_MEMBER or
past MAX_MEMBERS), with one line; the local image and the pool stay as they were.

No huge file is made: the bounds are patched down, in the one module that holds each (the
readers read it there too, so a test also shows that a writer and a reader move together).
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import pytest

from torpor._errors import ImageCorruptedError, PoolError, UnsafeImageError
from torpor._images._image import Image
from torpor._pools import Pool, _archive, _pool, _record, _session, _write
from torpor._pools._backend import PoolObjectTooLargeError
from torpor._pools._cas import PAGE_SIZE
from torpor._pools._memory import MemoryBackend
from torpor._pools._record import _compress_bound, image_key

from .test_pool_support import FAST, make_image, random_pages, touch_pages

LIST_BOUND = 4096  # MAX_LIST patched down: 128 pages' digests


def _new(name: str = "mem") -> Pool:
    return Pool(name, MemoryBackend(), timing=FAST, cache=False)


def _image(tmp_path: Path, pages: int, name: str = "app", *, files: int = 0) -> Image:
    extra = {f"extra-{i}.img": b"x" * i for i in range(files)}
    return make_image(tmp_path / "local", name, bytes(random_pages(pages, seed=pages)), extra=extra)


def _contents(image: Image) -> dict[str, str]:
    files = sorted(image.path.glob("*.img"))  # the content, not torpor's own files
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _keys(pool: Pool) -> set[str]:
    return set(pool.backend.list(""))


def _refused(exc: pytest.ExceptionInfo[PoolError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.fixture
def list_bound(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(_record, "MAX_LIST", LIST_BOUND)
    return LIST_BOUND


def test_a_push_whose_list_is_over_max_list_stores_nothing(
    tmp_path: Path, torpor_home: Path, list_bound: int
) -> None:
    pool = _new()
    pool.push(_image(tmp_path / "old", 50, "old"), "old")  # inline list: within any bound
    before = _keys(pool)
    image = _image(tmp_path, 140)  # 140 digests: 4480 bytes of list
    files = _contents(image)
    with pytest.raises(PoolError) as exc:
        pool.push(image, "app")
    assert _refused(exc) == (
        "image 'app' cannot be stored in pool 'mem': its file pages-1.img (560.0 KiB) needs "
        "a chunk list of 4.4 KiB, over the pool format's 4.0 KiB — checkpoint a smaller "
        "process, or keep this image local"
    )
    assert _keys(pool) == before  # not one pack, list, manifest or session left
    assert [i.name for i in pool.list_images()] == ["old"]
    assert _contents(image) == files


def test_a_list_of_exactly_max_list_is_pushed_and_pulled(
    tmp_path: Path, torpor_home: Path, list_bound: int
) -> None:
    pool = _new()
    pool.push(_image(tmp_path, 128), "app")  # 128 digests: exactly 4096 bytes
    assert _contents(pool.pull("app")) == _contents(_image(tmp_path / "again", 128))


def test_what_the_writer_refuses_for_max_list_the_reader_refuses(
    tmp_path: Path, torpor_home: Path, list_bound: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same patched MAX_LIST, the writer's check left out: the reader refuses the image.
    monkeypatch.setattr(_write, "file_problem", lambda size, chunk_size: None)
    pool = _new()
    pool.push(_image(tmp_path, 140), "app")
    with pytest.raises(PoolObjectTooLargeError) as exc:
        pool.pull("app")
    assert exc.value.key.startswith("lists/")


def test_a_file_over_max_file_size_is_refused_and_so_is_it_by_the_reader(
    tmp_path: Path, torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_record, "MAX_FILE_SIZE", 100 * PAGE_SIZE)
    pool = _new()
    before = _keys(pool)
    image = _image(tmp_path, 101)
    with pytest.raises(PoolError) as exc:
        pool.push(image, "app")
    assert _refused(exc) == (
        "image 'app' cannot be stored in pool 'mem': its file pages-1.img (404.0 KiB) is "
        "over the pool format's 400.0 KiB for a file — checkpoint a smaller process, or keep "
        "this image local"
    )
    assert _keys(pool) == before
    monkeypatch.setattr(_write, "file_problem", lambda size, chunk_size: None)
    pool.push(image, "app")
    with pytest.raises(ImageCorruptedError) as bad:
        pool.image("app")
    assert "size 413696 is out of range" in bad.value.msg


def _record_json_size(pool: Pool, name: str) -> int:
    return len(_record._record_json(pool.backend.get(image_key(name))))


def test_a_manifest_over_max_record_is_not_stored_nor_its_lists(
    tmp_path: Path, torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = _new()
    ref.push(_image(tmp_path / "ref", 300, files=20), "app")
    pool = _new()
    pool.push(_image(tmp_path / "old", 1, "old"), "old")
    small, size = _record_json_size(pool, "old"), _record_json_size(ref, "app")
    assert small < size - 1024
    bound = (small + size) // 2  # old's manifest is within it, app's is not
    monkeypatch.setattr(_record, "MAX_RECORD", bound)
    before = _keys(pool)
    image = _image(tmp_path, 300, files=20)
    files = _contents(image)
    with pytest.raises(PoolError) as exc:
        pool.push(image, "app")
    message = _refused(exc)
    assert message.startswith("image 'app' cannot be stored in pool 'mem': its pool manifest ")
    assert f"over the pool format's {_record.human(bound)} — " in message
    left = _keys(pool) - before
    assert left  # the packs, stored before the manifest's size is known...
    assert {k.split("/", 1)[0] for k in left} == {"packs", "index"}  # ...but no list, no manifest
    assert [i.name for i in pool.list_images()] == ["old"]
    assert _contents(image) == files
    pool.gc()  # what any push that failed before its manifest leaves: garbage
    assert _keys(pool) == before


def test_what_the_writer_refuses_for_max_record_the_reader_refuses(
    tmp_path: Path, torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = _new()
    ref.push(_image(tmp_path / "ref", 300), "app")
    bound = _record_json_size(ref, "app") // 2
    monkeypatch.setattr(_record, "MAX_RECORD", bound)
    monkeypatch.setattr(_write.PoolWriter, "_check_record", lambda *a, **k: None)
    pool = _new()
    pool.push(_image(tmp_path, 300), "app")
    with pytest.raises(ImageCorruptedError) as exc:
        pool.image("app")
    assert exc.value.msg.endswith(f", more than {bound})")


def test_a_where_over_max_where_packs_is_left_out(
    tmp_path: Path, torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_record, "MAX_WHERE_PACKS", 0)
    pool = _new()
    image = _image(tmp_path, 300)
    pool.push(image, "app")
    assert pool._record("app").where is None  # read back under the same bound
    assert _contents(pool.pull("app")) == _contents(image)


def test_a_manifest_over_max_record_only_by_its_where_is_stored_without_it(
    tmp_path: Path, torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = _new()
    ref.push(_image(tmp_path / "ref", 300), "app")
    with_where = _record_json_size(ref, "app")
    with monkeypatch.context() as m:
        m.setattr(_record, "MAX_WHERE_PACKS", 0)
        bare = _new()
        bare.push(_image(tmp_path / "bare", 300), "app")
        without = _record_json_size(bare, "app")
    assert with_where > without + 32
    monkeypatch.setattr(_record, "MAX_RECORD", without + 16)
    pool = _new()
    image = _image(tmp_path, 300)
    pool.push(image, "app")
    assert pool._record("app").where is None
    assert _contents(pool.pull("app")) == _contents(image)


def test_an_import_over_the_target_s_bounds_stores_nothing(
    tmp_path: Path, torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _new("src")
    src.push(_image(tmp_path, 140), "app")
    out = tmp_path / "app.torpor"
    src.export_image("app", out)
    monkeypatch.setattr(_record, "MAX_LIST", LIST_BOUND)
    pool = _new()
    before = _keys(pool)
    with pytest.raises(PoolError) as exc:
        pool.import_image(out)
    assert _refused(exc) == (
        "image 'app' cannot be stored in pool 'mem': its file pages-1.img (560.0 KiB) needs "
        "a chunk list of 4.4 KiB, over the pool format's 4.0 KiB — it stays as it is in "
        "'archive'"
    )
    assert _keys(pool) == before


def test_an_export_whose_list_member_is_over_max_member_writes_nothing(
    tmp_path: Path, torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _new()
    pool.push(_image(tmp_path, 140), "app")
    fine = io.BytesIO()
    pool.export_image("app", fine)
    monkeypatch.setattr(_archive, "MAX_MEMBER", LIST_BOUND)
    buf = io.BytesIO()
    with pytest.raises(PoolError) as exc:
        pool.export_image("app", buf)
    assert _refused(exc) == (
        "image 'app' in pool 'mem' cannot be exported: its file pages-1.img (560.0 KiB) has a "
        "chunk list object that would be 4.5 KiB, over the 4.0 KiB an import reads — it stays "
        "in 'mem'; copy it to another pool instead"
    )
    assert buf.getvalue() == b""  # not one byte
    # The same bound, one constant, is the import's: the archive made before is refused.
    fine.seek(0)
    with pytest.raises(UnsafeImageError) as bad:
        _new("other").import_image(fine)
    assert f"is larger than {LIST_BOUND} bytes" in bad.value.msg


def test_the_archive_writer_refuses_a_member_an_import_would_refuse(
    tmp_path: Path, torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past the export's own check (left out): the tar writer refuses the member itself (the
    # first pack, here, before the list: random pages do not compress).
    pool = _new()
    pool.push(_image(tmp_path, 140), "app")
    monkeypatch.setattr(_archive, "MAX_MEMBER", LIST_BOUND)
    monkeypatch.setattr(_pool, "export_problem", lambda size, chunk_size: None)
    out = tmp_path / "app.torpor"
    with pytest.raises(PoolError) as exc:
        pool.export_image("app", out)
    message = _refused(exc)
    assert message.startswith(f"cannot write the archive {out}: its member packs/")
    assert message.endswith(
        " KiB, over the 4.0 KiB an import reads — the image stays in its pool; "
        "copy it to another pool instead"
    )
    assert not out.exists()


def test_export_and_import_agree_on_max_members(
    tmp_path: Path, torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _new()
    pool.push(_image(tmp_path, 300), "app")
    ref = io.BytesIO()
    pool.export_image("app", ref)
    ref.seek(0)
    members = len(_archive.ArchiveReader(ref, source="ref")._members)
    monkeypatch.setattr(_archive, "MAX_MEMBERS", members)  # exactly enough: both take it
    at = tmp_path / "at.torpor"
    pool.export_image("app", at)
    assert _new("other").import_image(at).name == "app"
    monkeypatch.setattr(_archive, "MAX_MEMBERS", members - 1)  # one short: both refuse
    over = tmp_path / "over.torpor"
    with pytest.raises(PoolError) as exc:
        pool.export_image("app", over)
    assert f"would be member number {members}, over the {members - 1} an import reads" in (
        _refused(exc)
    )
    assert not over.exists()
    with pytest.raises(UnsafeImageError):
        _new("third").import_image(at)


def test_the_largest_list_a_pool_holds_is_a_member_an_import_reads() -> None:
    pages = _record.MAX_LIST // 32  # a pages file whose chunk list is exactly MAX_LIST
    assert _record.file_problem(pages * PAGE_SIZE, PAGE_SIZE) is None
    assert _archive.export_problem(pages * PAGE_SIZE, PAGE_SIZE) is None
    assert _compress_bound(_record.MAX_LIST) <= _archive.MAX_MEMBER
    assert _record.file_problem((pages + 1) * PAGE_SIZE, PAGE_SIZE) == (
        "needs a chunk list of 1.0 GiB, over the pool format's 1.0 GiB"
    )


def test_a_condemned_set_over_its_bound_is_not_stored_and_nothing_is_deleted(
    tmp_path: Path, torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _new()
    pool.push(_image(tmp_path, 300), "app")
    pool.delete_image("app")
    before = _keys(pool)
    monkeypatch.setattr(_session, "MAX_CONDEMNED", 16)
    with pytest.raises(PoolError) as exc:
        pool.gc()
    message = _refused(exc)
    assert message.startswith("gc/condemned: this collection would condemn 1 packs and 1 lists")
    assert "over the 16 bytes a transfer reads of it; nothing was deleted — " in message
    assert _keys(pool) == before


def test_a_copy_in_the_same_pool_over_max_record_is_not_stored(
    tmp_path: Path, torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _new()
    pool.push(_image(tmp_path, 300), "a")
    monkeypatch.setattr(_record, "MAX_RECORD", _record_json_size(pool, "a") + 64)
    before = _keys(pool)
    long = "a" + "x" * 100  # named twice in the manifest: 200 bytes more
    with pytest.raises(PoolError) as exc:
        pool.copy_image("a", long)
    assert _refused(exc).startswith(f"image {long!r} cannot be stored in pool 'mem': its pool ")
    assert _keys(pool) == before
    assert pool.copy_image("a", "b").name == "b"  # a name as long fits


def _second_push(tmp_path: Path, pool: Pool) -> _record.FileRecord:
    """Push ``base`` (1000 pages), then ``next``: 100 of its pages changed; next's pages file."""
    data = random_pages(1000, seed=7)
    pool.push(make_image(tmp_path / "base", "base", bytes(data)), "base")
    touch_pages(data, 0.1, random.Random(3))
    pool.push(make_image(tmp_path / "next", "next", bytes(data)), "next")
    (f,) = [f for f in pool._record("next").files if f.name == "pages-1.img"]
    return f


def test_patches_take_a_bounded_share_of_the_manifest(
    tmp_path: Path, torpor_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    patched = _second_push(tmp_path / "ref", _new())
    assert patched.patch  # unbounded: the changes are stored as a patch of base's list
    monkeypatch.setattr(_record, "MAX_RECORD", int(len(patched.patch) / _write.PATCH_SHARE) - 1)
    pool = _new()
    f = _second_push(tmp_path, pool)
    assert f.patch == b"" and f.list_id != pool._record("base").files[0].list_id
    assert f.list_id is not None  # a keyframe of its own instead
