"""Outputs a remote driver left on S3 (``s3://`` URLs, as the AWS driver reports them) reach
the run store: through s3fs against a real moto S3 server on the loopback interface (the S3
protocol over HTTP, not a mock of our code). Directory outputs are archived by GNU tar exactly
as the AWS attempt script does (``tar -czf OUT -- PATH`` in the attempt directory)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from stowplan.actors.store import StoreActor
from stowplan.provenance.store import ArtifactsNotStored, RunStore
from stowplan.spec.canonical import sha256_hex
from tests.unit.provenance.test_store import experiment, run

pytestmark = pytest.mark.integration

BUCKET = "outputs"
PREFIX = "stowplan/attempts/RUN/KEY/outputs"


@pytest.fixture(scope="module", autouse=True)
def outputs_bucket(s3: Any) -> None:
    s3.create_bucket(Bucket=BUCKET)


def attempt_dir(tmp_path: Path) -> Path:
    d = tmp_path / "attempt"
    (d / "d" / "sub").mkdir(parents=True)
    (d / "d" / "a.txt").write_text("a")
    (d / "d" / "sub" / "b.txt").write_text("b")
    (d / "d" / "in.txt").symlink_to("sub/b.txt")
    (d / "model.bin").write_bytes(os.urandom(3 * (1 << 20) + 5))  # more than one chunk
    return d


def gnu_tar(attempt: Path, path: str) -> Path:
    """The archive the AWS attempt script's ``out_dir`` makes of a directory output."""
    tar = shutil.which("tar")
    assert tar is not None, "GNU tar is needed (the AWS attempt script uses it)"
    out = attempt.parent / f"{path.replace('/', '_')}.tar.gz"
    subprocess.run([tar, "-czf", str(out), "--", path], cwd=attempt, check=True)
    return out


def test_s3_outputs_are_stored_under_the_names_local_outputs_get(s3: Any, tmp_path: Path) -> None:
    attempt = attempt_dir(tmp_path)
    s3.upload_file(str(attempt / "model.bin"), BUCKET, f"{PREFIX}/model.bin")
    s3.upload_file(str(gnu_tar(attempt, "d")), BUCKET, f"{PREFIX}/d.tar.gz")
    with RunStore(tmp_path / "state" / "runs.db") as store:
        e = experiment()
        store.put_experiment(e)
        r, local = run(e, 0), run(e, 1)
        store.put_runs([r, local])
        urls = {
            "model.bin": f"s3://{BUCKET}/{PREFIX}/model.bin",
            "d/": f"s3://{BUCKET}/{PREFIX}/d.tar.gz",
        }
        recs = store.put_artifacts(r.run_id, urls)
        here = store.put_artifacts(
            local.run_id, {"model.bin": str(attempt / "model.bin"), "d/": str(attempt / "d")}
        )
        assert [(a.name, a.sha256, a.size) for a in recs] == [
            (a.name, a.sha256, a.size) for a in here
        ]
        assert [a.name for a in recs] == ["d/a.txt", "d/in.txt", "d/sub/b.txt", "model.bin"]
        model = recs[-1]
        assert model.sha256 == sha256_hex((attempt / "model.bin").read_bytes())
        assert Path(model.path).read_bytes() == (attempt / "model.bin").read_bytes()
        assert store.artifacts_for([r.run_id])[r.run_id] == recs
        assert store.latest_artifact_named("d/sub/b.txt") == recs[2].sha256
        assert store.put_artifacts(r.run_id, urls) == recs


def test_a_missing_s3_output_fails_its_run_and_the_others_are_stored(
    s3: Any, tmp_path: Path
) -> None:
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/ok.txt", Body=b"ok")
    ok = f"s3://{BUCKET}/{PREFIX}/ok.txt"
    missing = f"s3://{BUCKET}/{PREFIX}/never-uploaded.txt"
    no_bucket = "s3://no-such-bucket/x.tar.gz"
    path = tmp_path / "state" / "runs.db"
    with RunStore(path) as store:
        e = experiment()
        store.put_experiment(e)
        r, other = run(e, 0), run(e, 1)
        store.put_runs([r, other])
        with pytest.raises(ArtifactsNotStored) as caught:
            store.put_artifacts(r.run_id, {"ok.txt": ok, "gone.txt": missing, "d/": no_bucket})
        assert caught.value.failed == [
            f"d/: {no_bucket} does not exist",
            f"gone.txt: {missing} does not exist",
        ]
        assert [a.name for a in store.artifacts_for([r.run_id])[r.run_id]] == ["ok.txt"]

    # what the queue calls: a message per run whose outputs were not all stored, never a raise
    actor = StoreActor(str(path))
    try:
        why = actor.store_outputs({r.run_id: {"gone.txt": missing}, other.run_id: {"ok.txt": ok}})
        assert list(why) == [r.run_id] and why[r.run_id].endswith(f"{missing} does not exist")
        assert [a.name for a in actor.store.artifacts_for([other.run_id])[other.run_id]] == [
            "ok.txt"
        ]
    finally:
        actor.store.close()
