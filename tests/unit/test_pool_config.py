"""Pool configuration: validation per driver, persistence, secrets, the driver registry."""

from __future__ import annotations

import stat
from dataclasses import replace
from pathlib import Path

import pytest

from torpor._errors import (
    AlreadyExistsError,
    NotFoundError,
    PoolConfigError,
    PoolError,
    UsageError,
)
from torpor._pools import (
    DRIVERS,
    _config,
    _registry,
    create_pool,
    delete_pool,
    list_configs,
    load_config,
    set_pool,
)
from torpor._pools._config import MASK, check_pool_name, parse_assignments, validate
from torpor._pools._registry import get_driver, open_backend


def test_default_pool_exists_out_of_the_box(torpor_home: Path) -> None:
    (cfg,) = list_configs()
    assert (cfg.name, cfg.driver) == ("default", "dir")
    assert cfg.effective()["source"] == str(torpor_home / "pools" / "default")
    assert cfg.effective()["compression.level"] == "3"


@pytest.mark.parametrize(
    ("driver", "config", "key", "fragment"),
    [
        ("dir", {"sorce": "/x"}, "sorce", "did you mean 'source'"),
        ("dir", {"source": "relative/path"}, "source", "absolute path"),
        ("dir", {"compression.level": "30"}, "compression.level", "from 1 to 19"),
        ("dir", {"compression.level": "fast"}, "compression.level", "integer"),
        ("ceph", {"ceph.osd.pg_num": "0"}, "ceph.osd.pg_num", "from 1 to 65536"),
        ("ceph", {"ceph.cluster_name": "a b"}, "ceph.cluster_name", "letters, digits"),
        ("ceph", {"ceph.keyring": "/k"}, "ceph.keyring", "ceph.conf"),
        ("ceph", {"s3.bucket": "b"}, "s3.bucket", "ceph driver knows"),
        ("s3", {}, "s3.bucket", "needs s3.bucket"),
        ("s3", {"s3.bucket": "Bad_Bucket"}, "s3.bucket", "S3 bucket name"),
        ("s3", {"s3.bucket": "ok-b", "s3.endpoint": "ftp://x"}, "s3.endpoint", "http://"),
        ("s3", {"s3.bucket": "ok-b", "s3.secret_key": " "}, "s3.secret_key", "secret value"),
    ],
)
def test_bad_config_names_the_key_and_the_fix(
    driver: str, config: dict[str, str], key: str, fragment: str
) -> None:
    with pytest.raises(PoolConfigError) as info:
        validate("p", get_driver(driver), config)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert info.value.hint


def test_secret_values_never_show() -> None:
    with pytest.raises(PoolConfigError) as info:
        validate("p", get_driver("s3"), {"s3.bucket": "b-1", "s3.secret_key": "   "})
    assert "   " not in str(info.value).replace("    ", "")
    cfg = _config.PoolConfig("p", "s3", {"s3.bucket": "b-1", "s3.secret_key": "hunter2"})
    assert cfg.shown()["s3.secret_key"] == MASK
    assert "hunter2" not in repr(cfg.shown()) and "hunter2" not in cfg.location


def test_defaults_follow_the_lxd_ceph_driver() -> None:
    cfg = _config.PoolConfig("imgs", "ceph", {"ceph.cluster_name": "prod"})
    eff = cfg.effective()
    assert eff["ceph.osd.pool_name"] == "imgs"
    assert eff["ceph.user.name"] == "admin"
    assert eff["ceph.osd.pg_num"] == "32"
    assert eff["ceph.conf"] == "/etc/ceph/prod.conf"
    assert cfg.location == "rados://prod/imgs"


def test_pool_names() -> None:
    for good in ("default", "a", "ceph-1", "A_b"):
        assert check_pool_name(good) == good
    for bad in ("", "a.b", "../x", "a/b", "-a", "x" * 64, "a b"):
        with pytest.raises(UsageError):
            check_pool_name(bad)


def test_assignments() -> None:
    assert parse_assignments(["a=1", "b=", "c=x=y"]) == {"a": "1", "b": "", "c": "x=y"}
    for bad in (["a"], ["=1"]):
        with pytest.raises(UsageError, match="key=value"):
            parse_assignments(bad)


def test_create_persists_privately_and_refuses_duplicates(
    torpor_home: Path, tmp_path: Path
) -> None:
    cfg = create_pool("local", "dir", {"source": str(tmp_path / "data")})
    path = torpor_home / "pools" / "local.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_config("local") == cfg
    assert (tmp_path / "data" / "torpor-pool.json").exists()
    assert [c.name for c in list_configs()] == ["default", "local"]
    with pytest.raises(AlreadyExistsError):
        create_pool("local", "dir", {})
    with pytest.raises(AlreadyExistsError):
        create_pool("default", "dir", {})


def test_a_failed_create_saves_nothing(torpor_home: Path) -> None:
    with pytest.raises(PoolError):
        create_pool("c", "ceph", {"ceph.conf": "/nonexistent/ceph.conf"})
    with pytest.raises(NotFoundError):
        load_config("c")


def test_set_validates_and_refuses_moving_the_data(torpor_home: Path, tmp_path: Path) -> None:
    create_pool("local", "dir", {"source": str(tmp_path / "d")})
    cfg = set_pool("local", {"compression.level": "9"})
    assert (
        load_config("local").config["compression.level"] == "9" == cfg.config["compression.level"]
    )
    with pytest.raises(PoolConfigError, match="cannot be changed") as info:
        set_pool("local", {"source": str(tmp_path / "elsewhere")})
    assert info.value.key == "source"
    with pytest.raises(PoolConfigError, match="unknown key"):
        set_pool("local", {"nope": "1"})
    assert "compression.level" not in set_pool("local", {"compression.level": ""}).config
    set_pool("default", {"compression.level": "1"})
    assert load_config("default").config == {"compression.level": "1"}


def test_delete_refuses_pools_with_images_unless_forced(torpor_home: Path, tmp_path: Path) -> None:
    from torpor._pools import open_pool

    from .test_pool_support import make_image, random_pages

    create_pool("p", "dir", {})
    data_dir = torpor_home / "pools" / "p"
    with open_pool("p") as pool:
        pool.push(make_image(tmp_path, "x", bytes(random_pages(10))), "x")
    with pytest.raises(PoolError, match="holds 1 image"):
        delete_pool("p")
    assert delete_pool("p", force=True) > 2
    assert not data_dir.exists()
    with pytest.raises(NotFoundError):
        load_config("p")
    with pytest.raises(PoolError, match="default pool cannot be deleted"):
        delete_pool("default")


def test_delete_leaves_a_users_source_directory(torpor_home: Path, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "unrelated").write_text("keep me")
    create_pool("p", "dir", {"source": str(tmp_path / "mine")})
    delete_pool("p")
    assert (tmp_path / "mine" / "unrelated").read_text() == "keep me"
    assert not (tmp_path / "mine" / "torpor-pool.json").exists()


def test_unknown_driver_and_missing_library(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PoolError, match="unknown pool driver") as info:
        get_driver("nfs")
    assert "dir, s3" in (info.value.hint or "") or "ceph" in (info.value.hint or "")
    missing = replace(DRIVERS["s3"], target="torpor_no_such_module:S3Backend")
    with pytest.raises(PoolError, match="not available") as info:
        open_backend(missing, "p", {"s3.bucket": "b-1"})
    assert info.value.hint == "pip install 'torpor[s3]'"


def test_every_driver_is_lazy() -> None:
    for driver in _registry.DRIVERS.values():
        module, _, attr = driver.target.partition(":")
        assert module.startswith("torpor._pools._") and attr.endswith("Backend")
        assert driver.install_hint


def test_corrupt_config_file_is_reported(torpor_home: Path) -> None:
    (torpor_home / "pools").mkdir(exist_ok=True)
    (torpor_home / "pools" / "bad.json").write_text("{")
    with pytest.raises(PoolError, match="malformed"):
        load_config("bad")
