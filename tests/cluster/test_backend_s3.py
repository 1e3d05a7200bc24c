"""The ``s3`` pool driver against Ceph's RGW: the conformance suite, then S3 specifics."""

from __future__ import annotations

import io
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conformance.backend_suite import LARGE, MIB, BackendConformance, TrickleStream, payload

from torpor._errors import PoolConfigError, PoolError
from torpor._pools._backend import Backend
from torpor._pools._s3 import S3Backend

pytestmark = pytest.mark.ceph


@pytest.fixture(scope="module")
def s3_admin(ceph_cluster: dict[str, Any], boto3_module: Any) -> Iterator[Any]:
    """A raw boto3 client for the cluster's RGW, to look under the driver and clean up."""
    from botocore.config import Config

    client = boto3_module.session.Session().client(
        "s3",
        endpoint_url=ceph_cluster["s3_endpoint"],
        aws_access_key_id=ceph_cluster["s3_access_key"],
        aws_secret_access_key=ceph_cluster["s3_secret_key"],
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    yield client
    client.close()


def empty(s3_admin: Any, bucket: str, prefix: str = "") -> None:
    """Delete every object (and unfinished upload) under ``prefix`` in ``bucket``."""
    for page in s3_admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            s3_admin.delete_object(Bucket=bucket, Key=obj["Key"])
    uploads = s3_admin.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", ())
    for upload in uploads:
        s3_admin.abort_multipart_upload(
            Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
        )


def remove_bucket(s3_admin: Any, bucket: str) -> None:
    try:
        s3_admin.head_bucket(Bucket=bucket)
    except s3_admin.exceptions.ClientError:
        return  # never created
    empty(s3_admin, bucket)
    s3_admin.delete_bucket(Bucket=bucket)


@pytest.fixture
def bucket(s3_admin: Any) -> Iterator[str]:
    """A fresh bucket name; the bucket and everything in it are removed afterwards."""
    name = f"torpor-test-{uuid.uuid4().hex[:12]}"
    yield name
    remove_bucket(s3_admin, name)


@pytest.fixture(scope="module")
def shared_bucket(s3_admin: Any) -> Iterator[str]:
    """One bucket for the conformance tests (creating a bucket costs RGW ~0.3 s)."""
    name = f"torpor-suite-{uuid.uuid4().hex[:12]}"
    yield name
    remove_bucket(s3_admin, name)


def make_backend(info: dict[str, Any], bucket: str, **kwargs: Any) -> S3Backend:
    return S3Backend(
        info["s3_endpoint"], bucket, None, info["s3_access_key"], info["s3_secret_key"], **kwargs
    )


class TestS3Backend(BackendConformance):
    @pytest.fixture
    def backend(
        self, ceph_cluster: dict[str, Any], shared_bucket: str, s3_admin: Any
    ) -> Iterator[S3Backend]:
        """A backend on its own prefix of the shared bucket, emptied afterwards."""
        self.endpoint = ceph_cluster["s3_endpoint"]
        self.bucket = shared_bucket
        self.prefix = f"t-{uuid.uuid4().hex[:12]}/"
        b = make_backend(ceph_cluster, shared_bucket, prefix=self.prefix)
        yield b
        b.close()
        empty(s3_admin, shared_bucket, self.prefix)

    def assert_private(self, backend: Backend, key: str) -> None:
        """An anonymous GET of the object (and of the bucket listing) is refused."""
        for url in (f"{self.endpoint}/{self.bucket}/{self.prefix}{key}",
                    f"{self.endpoint}/{self.bucket}"):  # fmt: skip
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(url, timeout=10)
            assert info.value.code == 403, url


def test_bucket_is_created_once(ceph_cluster: dict[str, Any], bucket: str, s3_admin: Any) -> None:
    first = make_backend(ceph_cluster, bucket)
    first.put("k", b"v")
    second = make_backend(ceph_cluster, bucket)  # the bucket exists now: reused, not emptied
    assert second.get("k") == b"v"
    first.close()
    second.close()
    names = [b["Name"] for b in s3_admin.list_buckets()["Buckets"]]
    assert names.count(bucket) == 1


def test_large_values_use_multipart_upload(
    ceph_cluster: dict[str, Any], bucket: str, s3_admin: Any
) -> None:
    b = make_backend(ceph_cluster, bucket)
    b.put_stream("big", TrickleStream(payload(LARGE)))  # type: ignore[arg-type]
    b.put("small", payload(MIB))
    etag_big = s3_admin.head_object(Bucket=bucket, Key="big")["ETag"]
    etag_small = s3_admin.head_object(Bucket=bucket, Key="small")["ETag"]
    assert etag_big.strip('"').endswith(f"-{LARGE // (8 * MIB)}")  # 8 MiB parts
    assert "-" not in etag_small
    assert s3_admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    b.close()


def test_credentials_from_the_environment(
    ceph_cluster: dict[str, Any], bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ceph_cluster["s3_access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ceph_cluster["s3_secret_key"])
    b = S3Backend(ceph_cluster["s3_endpoint"], bucket)
    b.put("env", b"ok")
    assert b.get("env") == b"ok"
    b.close()


def test_wrong_secret_is_a_pool_error_with_a_hint(
    ceph_cluster: dict[str, Any], bucket: str
) -> None:
    with pytest.raises(PoolError, match="Forbidden") as info:
        S3Backend(ceph_cluster["s3_endpoint"], bucket, None, ceph_cluster["s3_access_key"], "x")
    assert info.value.hint is not None and "secret key" in info.value.hint
    assert info.value.__cause__ is not None


def test_unreachable_endpoint_is_a_pool_error(bucket: str, boto3_module: Any) -> None:
    with pytest.raises(PoolError, match="cannot connect") as info:
        S3Backend("http://127.0.0.1:9", bucket, None, "a", "b", timeout=2)
    assert info.value.hint is not None and "endpoint" in info.value.hint


def test_pools_share_a_bucket_through_prefixes(
    ceph_cluster: dict[str, Any], bucket: str, s3_admin: Any
) -> None:
    web = make_backend(ceph_cluster, bucket, prefix="pools/web/")
    db = make_backend(ceph_cluster, bucket, prefix="pools/db/")
    web.put("images/1", b"w")
    db.put("images/1", b"d")
    assert web.get("images/1") == b"w" and db.get("images/1") == b"d"
    assert list(web.list()) == ["images/1"]
    assert list(web.list("images/")) == ["images/1"]
    assert s3_admin.get_object(Bucket=bucket, Key="pools/web/images/1")["Body"].read() == b"w"
    web.close()
    db.close()


def test_streamed_body_reads_through_the_buffer(ceph_cluster: dict[str, Any], bucket: str) -> None:
    b = make_backend(ceph_cluster, bucket)
    value = payload(5 * MIB + 3)
    b.put_stream("s", io.BytesIO(value), size=len(value))
    with b.get_stream("s") as stream:
        assert stream.read(1) == value[:1]
        assert stream.read() == value[1:]
    b.close()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"part_size": MIB}, "part_size"), ({"multipart_threshold": 6 * MIB}, "multipart_threshold"),
     ({"max_concurrency": 0}, "max_concurrency"), ({"prefix": "a"}, "prefix"),
     ({"prefix": "../"}, "prefix")],
)  # fmt: skip
def test_bad_configuration(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(PoolConfigError) as info:
        S3Backend("http://127.0.0.1:9", "b", **kwargs)
    assert info.value.key == key


def test_missing_boto3_is_a_pool_error_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("boto3", "boto3.session", "boto3.s3.transfer", "boto3.exceptions"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(PoolError, match="needs boto3") as info:
        S3Backend("http://127.0.0.1:9", "b")
    assert info.value.hint == "pip install 'torpor[s3]'"
