"""Data versions and the remote blob store on S3, through s3fs against a real moto S3 server
listening on the loopback interface (the S3 protocol over HTTP, not a mock of our code)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import s3fs  # in the test extras: missing, it must fail, never skip

from stowplan.errors import SpecError
from stowplan.provenance.capture import allowed_env
from stowplan.provenance.data import capture_data
from stowplan.provenance.store import RunStore

pytestmark = pytest.mark.integration


def _fresh() -> None:
    # s3fs caches listings and file systems per process; a new object must be seen as new
    s3fs.S3FileSystem.clear_instance_cache()


def test_versioned_buckets_give_version_ids_others_etags(s3: Any) -> None:
    s3.create_bucket(Bucket="versioned")
    s3.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
    first = s3.put_object(Bucket="versioned", Key="d/train.csv", Body=b"a,b\n")
    rec = capture_data("s3://versioned/d/train.csv", None, Path("."))
    assert rec.kind == "object" and rec.size == 4
    assert rec.version == f"version:{first['VersionId']}"
    assert rec.etag == first["ETag"].strip('"')

    second = s3.put_object(Bucket="versioned", Key="d/train.csv", Body=b"a,b\n1,2\n")
    _fresh()
    assert capture_data("s3://versioned/d/train.csv", None, Path(".")).version == (
        f"version:{second['VersionId']}"
    )

    s3.create_bucket(Bucket="plain")
    put = s3.put_object(Bucket="plain", Key="x.csv", Body=b"x\n")
    _fresh()
    rec = capture_data("s3://plain/x.csv", None, Path("."))
    assert rec.version == f"etag:{put['ETag'].strip(chr(34))}" and rec.version_id is None

    with pytest.raises(SpecError, match="does not exist"):
        capture_data("s3://plain/nope.csv", None, Path("."))


def test_blob_store_on_s3(s3: Any, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="blobs")
    _fresh()
    with RunStore(tmp_path / "a" / "runs.db", blob_url="s3://blobs/stowplan") as store:
        sha = store.put_blob(b"model weights")
    listed = s3.list_objects_v2(Bucket="blobs", Prefix="stowplan/sha256/")
    assert [o["Key"] for o in listed["Contents"]] == [f"stowplan/sha256/{sha[:2]}/{sha[2:]}"]
    with RunStore(tmp_path / "b" / "runs.db", blob_url="s3://blobs/stowplan") as other:
        assert other.get_blob(sha) == b"model weights"


def test_cloud_credentials_never_pass_the_env_filter(s3: Any) -> None:
    got = allowed_env(os.environ, ["AWS_*"])
    assert got["AWS_DEFAULT_REGION"] == "us-east-1"
    assert "AWS_ACCESS_KEY_ID" not in got and "AWS_SECRET_ACCESS_KEY" not in got
