"""``torpor pool ...`` and ``torpor image ...`` end to end on ``dir`` pools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from integration.helpers import parse_table  # tests/ is on sys.path (rootdir of the packages)

from torpor._cli import main

from .test_pool_support import make_image, random_pages


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_pool_lifecycle(
    torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "pool", "create", "fast", "dir", f"source={tmp_path}/fast")
    assert code == 0, err
    code, out, _ = run(capsys, "pool", "list")
    assert parse_table(out, ("NAME", "DRIVER", "LOCATION")) == {
        "default": {
            "NAME": "default",
            "DRIVER": "dir",
            "LOCATION": str(torpor_home / "pools" / "default"),
        },
        "fast": {"NAME": "fast", "DRIVER": "dir", "LOCATION": f"{tmp_path}/fast"},
    }
    code, out, _ = run(capsys, "pool", "show", "fast", "--json")
    shown = json.loads(out)
    assert shown["driver"] == "dir" and shown["usage"]["images"] == 0
    assert shown["config"]["compression.level"] == "3"
    code, _, err = run(capsys, "pool", "set", "fast", "compresion.level=5")
    assert code == 1 and "did you mean 'compression.level'" in err
    assert run(capsys, "pool", "set", "fast", "compression.level=5")[0] == 0
    code, out, _ = run(capsys, "pool", "show", "fast")
    assert "  compression.level: 5" in out.splitlines()  # set: no "(default)" after it
    assert run(capsys, "pool", "unset", "fast", "compression.level")[0] == 0
    code, _, err = run(capsys, "pool", "create", "s", "s3", "s3.bucket=x_y")
    assert code == 1 and "s3.bucket" in err and "S3 bucket name" in err
    assert run(capsys, "pool", "delete", "fast")[0] == 0
    code, out, _ = run(capsys, "pool", "list", "--json")
    assert [p["name"] for p in json.loads(out)] == ["default"]


def test_image_commands(
    torpor_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pages = bytes(random_pages(300))
    local = make_image(torpor_home / "images", "local", pages)
    assert run(capsys, "pool", "create", "other", "dir")[0] == 0

    code, out, err = run(capsys, "image", "push", "local", "web@default")
    assert (code, out.strip()) == (0, "web@default"), err
    code, out, err = run(capsys, "image", "copy", "web", "web2")
    assert (code, out.strip()) == (0, "web2@default"), err
    code, out, err = run(capsys, "image", "copy", "web@default", "web@other")
    assert (code, out.strip()) == (0, "web@other"), err
    code, out, err = run(capsys, "image", "pull", "web@other")
    assert code == 0, err
    assert (Path(out.strip()) / "pages-1.img").read_bytes() == pages

    archive = tmp_path / "web.tar"
    assert run(capsys, "image", "export", "web@other", str(archive))[0] == 0
    code, out, err = run(capsys, "image", "import", str(archive), "--name", "back")
    assert (code, out.strip()) == (0, "back@default"), err

    code, _, err = run(capsys, "pool", "delete", "other")
    assert code == 1 and "holds 1 image" in err and "--force" in err
    assert run(capsys, "image", "delete", "web@other")[0] == 0
    code, _, err = run(capsys, "image", "delete", "web@other")
    assert code == 1 and "no image 'web'" in err

    code, out, _ = run(capsys, "image", "prune", "--keep", "1", "--pool", "default", "--gc")
    assert out.count("deleted") == 2  # web, web2, back share a command line: back stays
    code, out, _ = run(capsys, "pool", "gc", "default", "--json")
    assert json.loads(out)["images"] == 1
    code, _, err = run(capsys, "image", "copy", "../etc", "x")
    assert code == 1 and "invalid image name" in err
    assert local.path.is_dir()
