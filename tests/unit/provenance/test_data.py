"""Data versions through fsspec, and the (path, size, mtime) hash cache, on real files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from stowplan.errors import SpecError
from stowplan.provenance.capture import data_version
from stowplan.provenance.data import HashCache, capture_data


def test_file_record_has_size_mtime_and_hash(tmp_path: Path) -> None:
    f = tmp_path / "train.csv"
    f.write_bytes(b"a,b\n1,2\n")
    rec = capture_data("train.csv", None, tmp_path)
    want = hashlib.sha256(b"a,b\n1,2\n").hexdigest()
    assert rec.kind == "file" and rec.sha256 == want and rec.version == f"sha256:{want}"
    assert rec.size == 8 and rec.mtime == f.stat().st_mtime


def test_the_cache_reads_a_file_once_until_it_changes(tmp_path: Path) -> None:
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 1000)
    with HashCache(tmp_path / "cache.db") as cache:
        first = capture_data(str(f), None, tmp_path, cache=cache)
        again = capture_data(str(f), None, tmp_path, cache=cache)
        assert (cache.misses, cache.hits) == (1, 1)
        assert first == again
        # same size, same mtime, other bytes: ctime moves, so the cache is not fooled
        st = f.stat()
        f.write_bytes(b"y" * 1000)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        changed = capture_data(str(f), None, tmp_path, cache=cache)
        assert cache.misses == 2
        assert changed.sha256 == hashlib.sha256(b"y" * 1000).hexdigest()
    # the cache outlives the process that filled it
    with HashCache(tmp_path / "cache.db") as cache:
        assert capture_data(str(f), None, tmp_path, cache=cache) == changed
        assert (cache.misses, cache.hits) == (0, 1)


def test_a_cached_hash_is_the_hash_of_the_file(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    (d / "sub").mkdir(parents=True)
    (d / "a").write_bytes(b"1")
    (d / "sub" / "b").write_bytes(b"22")
    plain = data_version(str(d), None, tmp_path)
    with HashCache(tmp_path / "cache.db") as cache:
        assert data_version(str(d), None, tmp_path, cache=cache) == plain
        rec = capture_data(str(d), None, tmp_path, cache=cache)
        assert rec.kind == "directory" and rec.files == 2 and rec.size == 3
        assert cache.hits == 2


def test_an_object_without_etag_is_hashed_through_fsspec() -> None:
    fs = MemoryFileSystem()
    fs.pipe("/bucket/train.csv", b"a,b\n")
    try:
        rec = capture_data("memory://bucket/train.csv", None, Path("/nonexistent"))
        assert rec.kind == "object"
        assert rec.version == "sha256:" + hashlib.sha256(b"a,b\n").hexdigest()
        assert rec.size == 4
        with pytest.raises(SpecError, match="does not exist"):
            capture_data("memory://bucket/nope.csv", None, Path("/nonexistent"))
    finally:
        fs.rm("/bucket", recursive=True)


class VersionedStore(MemoryFileSystem):  # type: ignore[misc]
    """An fsspec file system that reports what S3 does: an ETag, and a version id when the
    bucket is versioned (the real thing needs a network; the contract is fsspec's info())."""

    protocol = ("vstore",)
    versioned: ClassVar[bool] = True

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        out = dict(super().info(path, **kwargs))
        data = self.cat_file(path)
        out["ETag"] = '"' + hashlib.md5(data).hexdigest() + '"'
        if self.versioned:
            out["VersionId"] = "v-" + hashlib.sha1(data).hexdigest()[:8]
        return out


def test_object_stores_give_version_ids_else_etags() -> None:
    fsspec.register_implementation("vstore", VersionedStore, clobber=True)
    fs, path = fsspec.core.url_to_fs("vstore://b/k.csv")
    fs.pipe(path, b"data")
    try:
        rec = capture_data("vstore://b/k.csv", None, Path("."))
        assert rec.version_id is not None and rec.version == f"version:{rec.version_id}"
        assert rec.etag == hashlib.md5(b"data").hexdigest()  # quotes stripped
        VersionedStore.versioned = False
        rec = capture_data("vstore://b/k.csv", None, Path("."))
        assert rec.version == f"etag:{hashlib.md5(b'data').hexdigest()}"
        assert rec.sha256 is None  # the bytes were not read
    finally:
        VersionedStore.versioned = True
        fs.rm(path)


def test_schemes_not_installed_here_stay_unpinned(tmp_path: Path) -> None:
    for uri in ("gs://bucket/train.csv", "https://example.org/d.tar", "nosuchscheme://x/y"):
        rec = capture_data(uri, None, tmp_path)
        assert rec.kind == "unpinned" and rec.version == f"unpinned:{uri}"
    assert capture_data("s3://b/k", "v9", tmp_path).version == "v9"


def test_a_store_that_cannot_be_asked_is_a_clear_error(tmp_path: Path) -> None:
    class Broken(MemoryFileSystem):  # type: ignore[misc]
        protocol = ("brokenstore",)

        def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
            raise RuntimeError("Unable to locate credentials")

    fsspec.register_implementation("brokenstore", Broken, clobber=True)
    with pytest.raises(SpecError, match="Unable to locate credentials") as err:
        capture_data("brokenstore://b/k", None, tmp_path)
    assert err.value.hint is not None and "pin" in err.value.hint


def test_an_unusable_cache_is_bypassed(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    f = tmp_path / "d.bin"
    f.write_bytes(b"123")
    with HashCache(tmp_path / "file" / "cache.db") as cache:
        rec = capture_data(str(f), None, tmp_path, cache=cache)
    assert rec.sha256 == hashlib.sha256(b"123").hexdigest()
    assert not (tmp_path / "nothing").exists()


def test_the_cache_file_appears_only_when_used(tmp_path: Path) -> None:
    with HashCache(tmp_path / "c" / "cache.db"):
        pass
    assert not (tmp_path / "c").exists()
