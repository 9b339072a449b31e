"""Outputs that live remotely (an fsspec URL instead of a local path) reach the run store:
``memory://`` and ``file://`` URLs here; ``s3://`` against moto's server in
``tests/integration/test_remote_outputs.py``."""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from stowplan.actors.store import StoreActor
from stowplan.provenance.records import ExperimentRecord
from stowplan.provenance.store import ArtifactsNotStored, RunStore
from stowplan.provenance.store.blobs import BlobStore
from stowplan.spec.canonical import sha256_hex
from tests.unit.provenance.test_store import experiment, run


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    s = RunStore(tmp_path / "state" / "runs.db")
    yield s
    s.close()


@pytest.fixture
def exp(store: RunStore) -> ExperimentRecord:
    e = experiment()
    store.put_experiment(e)
    return e


@pytest.fixture
def mem() -> Iterator[str]:
    """A fresh ``memory://`` prefix (the memory file system is one per process)."""
    root = f"memory://outputs-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def put(url: str, data: bytes) -> str:
    with fsspec.open(url, "wb") as f:
        f.write(data)
    return url


def tar_gz(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    """A gzipped tar of these entries, in this order: ``(name, data)`` is a regular file."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            if isinstance(e, tuple):
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tar.addfile(info, io.BytesIO(e[1]))
            else:
                tar.addfile(e)
    return raw.getvalue()


def entry(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info


def tree(tmp_path: Path) -> Path:
    """An attempt directory holding the directory output ``d``."""
    d = tmp_path / "attempt"
    (d / "d" / "sub").mkdir(parents=True)
    (d / "d" / "a.txt").write_text("a")
    (d / "d" / "sub" / "b.txt").write_text("b")
    (d / "d" / "in.txt").symlink_to("a.txt")
    return d


def tar_like_the_aws_script(attempt: Path, path: str) -> bytes:
    """What ``tar -czf OUT -- PATH`` run in the attempt directory writes (links kept)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        tar.add(attempt / path, arcname=path)
    return raw.getvalue()


def test_a_file_url_is_stored_by_content(
    store: RunStore, exp: ExperimentRecord, tmp_path: Path, mem: str
) -> None:
    r = run(exp, 0)
    store.put_runs([r])
    local = tmp_path / "local.txt"
    local.write_text("here")
    on_disk = tmp_path / "remote" / "metrics.json"
    on_disk.parent.mkdir()
    on_disk.write_bytes(b'{"acc": 0.9}')
    outputs = {
        "model.bin": put(f"{mem}/attempts/R/K/outputs/model.bin", b"\x00weights" * 1000),
        "metrics.json": on_disk.as_uri(),
        "local.txt": str(local),
        # a file output that happens to be an archive stays one file
        "bundle.tar.gz": put(f"{mem}/attempts/R/K/outputs/bundle.tar.gz", tar_gz([("x", b"x")])),
    }
    recs = store.put_artifacts(r.run_id, outputs)
    assert [a.name for a in recs] == ["bundle.tar.gz", "local.txt", "metrics.json", "model.bin"]
    by_name = {a.name: a for a in recs}
    assert by_name["model.bin"].sha256 == sha256_hex(b"\x00weights" * 1000)
    assert by_name["model.bin"].size == 8000
    assert Path(by_name["metrics.json"].path).read_bytes() == b'{"acc": 0.9}'
    assert Path(by_name["local.txt"].path).read_bytes() == b"here"
    assert store.artifacts_for([r.run_id])[r.run_id] == recs
    assert store.latest_artifact_named("model.bin") == by_name["model.bin"].sha256
    # putting them again changes nothing
    assert store.put_artifacts(r.run_id, outputs) == recs


def test_a_directory_tarball_gives_the_names_a_local_directory_gives(
    store: RunStore, exp: ExperimentRecord, tmp_path: Path, mem: str
) -> None:
    r, local = run(exp, 0), run(exp, 1)
    store.put_runs([r, local])
    attempt = tree(tmp_path)
    (attempt / "results").mkdir()
    (attempt / "results" / "e").mkdir()
    (attempt / "results" / "e" / "c.txt").write_text("c")
    remote = store.put_artifacts(
        r.run_id,
        {
            "d/": put(f"{mem}/outputs/d.tar.gz", tar_like_the_aws_script(attempt, "d")),
            "results/e/": put(
                f"{mem}/outputs/results/e.tar.gz", tar_like_the_aws_script(attempt, "results/e")
            ),
        },
    )
    here = store.put_artifacts(
        local.run_id, {"d/": str(attempt / "d"), "results/e/": str(attempt / "results" / "e")}
    )
    assert [(a.name, a.sha256, a.size) for a in remote] == [
        (a.name, a.sha256, a.size) for a in here
    ]
    assert [(a.name, Path(a.path).read_text()) for a in remote] == [
        ("d/a.txt", "a"),
        ("d/in.txt", "a"),  # a link inside: its content, as in a local directory
        ("d/sub/b.txt", "b"),
        ("results/e/c.txt", "c"),
    ]


def test_hard_links_entries_with_dot_and_an_empty_directory(
    store: RunStore, exp: ExperimentRecord, mem: str
) -> None:
    r = run(exp, 0)
    store.put_runs([r])
    archive = tar_gz(
        [
            entry(".", tarfile.DIRTYPE),
            entry("./d", tarfile.DIRTYPE),
            ("./d/a.txt", b"a"),
            entry("d/hard", tarfile.LNKTYPE, "d/a.txt"),
            entry("d/chain", tarfile.SYMTYPE, "hard"),
        ]
    )
    recs = store.put_artifacts(
        r.run_id,
        {
            "d/": put(f"{mem}/d.tar.gz", archive),
            "empty/": put(f"{mem}/empty.tar.gz", tar_gz([entry("empty", tarfile.DIRTYPE)])),
        },
    )
    assert [(a.name, a.sha256) for a in recs] == [
        ("d/a.txt", sha256_hex(b"a")),
        ("d/chain", sha256_hex(b"a")),
        ("d/hard", sha256_hex(b"a")),
    ]


def test_hostile_archive_entries_are_refused_and_the_rest_stored(
    store: RunStore, exp: ExperimentRecord, tmp_path: Path, mem: str
) -> None:
    r = run(exp, 0)
    store.put_runs([r])
    fifo = entry("d/pipe", tarfile.FIFOTYPE)
    archive = tar_gz(
        [
            entry("d", tarfile.DIRTYPE),
            ("d/ok.txt", b"ok"),
            ("/etc/evil", b"absolute"),
            ("../evil", b"up"),
            ("d/../../evil", b"up and around"),
            ("other/evil", b"beside"),
            entry("d/abs", tarfile.SYMTYPE, "/etc/passwd"),
            entry("d/up", tarfile.SYMTYPE, "../../etc/passwd"),
            entry("d/beside", tarfile.SYMTYPE, "../other/evil"),
            entry("d/hard", tarfile.LNKTYPE, "/etc/passwd"),
            entry("d/hard2", tarfile.LNKTYPE, "other/evil"),
            entry("d/dangling", tarfile.SYMTYPE, "nope.txt"),
            entry("d/loop", tarfile.SYMTYPE, "loop"),
            entry("d/dirlink", tarfile.SYMTYPE, "."),
            fifo,
            entry("d/dev", tarfile.CHRTYPE),
        ]
    )
    with pytest.raises(ArtifactsNotStored) as caught:
        store.put_artifacts(r.run_id, {"d/": put(f"{mem}/d.tar.gz", archive)})
    failed = caught.value.failed
    assert [a.name for a in caught.value.stored] == ["d/ok.txt"]
    assert [a.name for a in store.artifacts_for([r.run_id])[r.run_id]] == ["d/ok.txt"]
    assert len(failed) == 14, failed
    joined = "\n".join(failed)
    for why in (
        "d/: archive entry '/etc/evil' is an absolute path",
        "d/: archive entry '../evil' has a '..' component",
        "d/: archive entry 'd/../../evil' has a '..' component",
        "d/: archive entry 'other/evil' is outside d/",
        "d/abs: a link to /etc/passwd, an absolute path",
        "d/up: a link that leads outside d/",
        "d/beside: a link that leads outside d/",
        "d/hard: a link to /etc/passwd, an absolute path",
        "d/hard2: a link that leads outside d/",
        "d/dangling: a link to d/nope.txt, which is not a file in the archive",
        "d/loop: a link loop",
        "d/dirlink: a link to a directory, not followed in an archive",
        "d/pipe: not a regular file, directory or link",
        "d/dev: not a regular file, directory or link",
    ):
        assert why in joined
    # nothing was written anywhere but the blob store
    assert not (tmp_path / "evil").exists() and not Path("/etc/evil").exists()


def test_missing_and_unreadable_urls_fail_the_output_never_raise(
    store: RunStore, exp: ExperimentRecord, tmp_path: Path, mem: str
) -> None:
    r = run(exp, 0)
    store.put_runs([r])
    ok = put(f"{mem}/ok.txt", b"ok")
    missing = f"{mem}/attempts/R/K/outputs/nope.txt"
    gone = (tmp_path / "gone.txt").as_uri()
    not_tar = put(f"{mem}/d.zip", b"PK")
    corrupt = put(f"{mem}/e.tar.gz", b"not gzip at all")
    with pytest.raises(ArtifactsNotStored) as caught:
        store.put_artifacts(
            r.run_id,
            {
                "ok.txt": ok,
                "nope.txt": missing,
                "gone.txt": gone,
                "dir/": f"{mem}/dir.tar.gz",
                "d/": not_tar,
                "e/": corrupt,
                "odd": "nosuchscheme://bucket/x",
            },
        )
    failed = caught.value.failed
    assert failed[:3] == [
        f"d/: declared as a directory, but {not_tar} is not a .tar.gz archive",
        f"dir/: {mem}/dir.tar.gz does not exist",
        failed[2],
    ]
    assert failed[2].startswith(f"e/: {corrupt} is not a readable .tar.gz archive: ")
    assert f"gone.txt: {gone} does not exist" in failed
    assert f"nope.txt: {missing} does not exist" in failed
    assert any(f.startswith("odd: cannot be read from nosuchscheme://bucket/x: ") for f in failed)
    assert len(failed) == 6
    assert [a.name for a in store.artifacts_for([r.run_id])[r.run_id]] == ["ok.txt"]

    # through the store actor (what the queue calls): one run's failure is a message
    actor = StoreActor(str(tmp_path / "state" / "runs.db"))
    other = run(exp, 1)
    store.put_runs([other])
    why = actor.store_outputs({r.run_id: {"nope.txt": missing}, other.run_id: {"ok.txt": ok}})
    assert why == {
        r.run_id: f"run {r.run_id[:12]}: 1 output not stored (0 stored): "
        f"nope.txt: {missing} does not exist"
    }
    assert [a.name for a in store.artifacts_for([other.run_id])[other.run_id]] == ["ok.txt"]
    actor.store.close()


def test_credentials_in_a_url_are_never_shown(store: RunStore, exp: ExperimentRecord) -> None:
    r = run(exp, 0)
    store.put_runs([r])
    url = "nosuchscheme://AKIDEXAMPLE:hunter2secret@bucket/x?X-Amz-Signature=deadbeef"
    with pytest.raises(ArtifactsNotStored) as caught:
        store.put_artifacts(r.run_id, {"x": url})
    text = str(caught.value)
    assert "hunter2secret" not in text and "AKIDEXAMPLE" not in text and "deadbeef" not in text
    assert "nosuchscheme://bucket/x" in text


def test_put_stream_reads_in_bounded_chunks(tmp_path: Path) -> None:
    class Source:
        def __init__(self) -> None:
            self.left = 5 * (1 << 20) + 3
            self.asked: list[int] = []

        def read(self, n: int = -1) -> bytes:
            self.asked.append(n)
            take = min(n, self.left)
            self.left -= take
            return b"x" * take

    src = Source()
    sha, size, path = BlobStore(tmp_path / "blobs").put_stream(src)
    assert size == 5 * (1 << 20) + 3 and path.stat().st_size == size
    assert sha == sha256_hex(b"x" * size)
    assert all(0 < n <= 1 << 20 for n in src.asked)
