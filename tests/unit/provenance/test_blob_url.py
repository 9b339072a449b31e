"""The remote blob store: every blob copied to an fsspec URL, and read back from it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from stowplan.errors import StowplanError
from stowplan.provenance.store import BLOB_URL_ENV, RunStore
from tests.unit.provenance.test_store import experiment, run


def remote_path(root: Path, sha: str) -> Path:
    return root / "sha256" / sha[:2] / sha[2:]


def test_blobs_and_artifacts_are_copied_and_fetched_back(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    url = remote.as_uri()
    out = tmp_path / "metrics.json"
    out.write_bytes(b'{"acc": 0.9}')
    with RunStore(tmp_path / "a" / "runs.db", blob_url=url) as store:
        sha = store.put_blob(b"patch bytes")
        e = experiment()
        store.put_experiment(e)
        r = run(e, 0)
        store.put_runs([r])
        (art,) = store.put_artifacts(r.run_id, {"metrics.json": str(out)})
    assert remote_path(remote, sha).read_bytes() == b"patch bytes"
    assert remote_path(remote, art.sha256).read_bytes() == out.read_bytes()
    assert not list(remote.rglob("*.tmp-*"))

    # a second store (another machine) without the blobs directory reads them from the remote
    other = tmp_path / "b" / "runs.db"
    with RunStore(other, blob_url=url) as store:
        assert not store.blob_path(sha).exists()
        assert store.get_blob(sha) == b"patch bytes"
        assert store.blob_path(sha).exists()
        assert store.ensure_blob(art.sha256)
    # without the remote, a missing blob is missing
    with RunStore(tmp_path / "c" / "runs.db") as store:
        assert not store.ensure_blob(sha)
        with pytest.raises(KeyError):
            store.get_blob(sha)


def test_a_corrupt_remote_blob_is_not_taken(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    sha = hashlib.sha256(b"good").hexdigest()
    remote_path(remote, sha).parent.mkdir(parents=True)
    remote_path(remote, sha).write_bytes(b"evil")
    with RunStore(tmp_path / "runs.db", blob_url=remote.as_uri()) as store:
        assert not store.ensure_blob(sha)


def test_the_url_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BLOB_URL_ENV, (tmp_path / "env-remote").as_uri())
    with RunStore(tmp_path / "runs.db") as store:
        sha = store.put_blob(b"x")
    assert remote_path(tmp_path / "env-remote", sha).read_bytes() == b"x"


def test_an_unreachable_blob_store_is_an_error_naming_it(tmp_path: Path) -> None:
    with (
        RunStore(tmp_path / "runs.db", blob_url="nosuchscheme://bucket/x") as store,
        pytest.raises(StowplanError, match="nosuchscheme://bucket/x"),
    ):
        store.put_blob(b"x")
