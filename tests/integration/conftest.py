"""One real local Ray for the whole integration session, and experiment projects in tmp dirs."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stowplan.actors.runtime import init_ray, shutdown_ray

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    started = init_ray(address=None, namespace="stowplan-tests", num_cpus=2)
    yield
    if started:
        shutdown_ray()


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """A real moto S3 server on the loopback for one test module, with the environment s3fs
    and boto3 read (``AWS_ENDPOINT_URL`` and test credentials); yields a boto3 S3 client."""
    import boto3
    import s3fs  # in the test extras: missing, it must fail, never skip
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield boto3.client("s3")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def quickstart(tmp_path: Path) -> Path:
    """A copy of examples/ in a fresh project directory; returns the experiment file."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    shutil.copy(REPO / "stowplan.toml", tmp_path / "stowplan.toml")
    return tmp_path / "examples" / "quickstart.toml"


def sweep_project(tmp_path: Path, n: int, sleep: float = 0.4) -> Path:
    """A project with a local provider of 2 CPUs and an n-trial sweep that leaves a marker."""
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "crash"\n[providers.local]\nkind = "local"\ncpus = 2\n'
    )
    marker = tmp_path / "executions.log"
    # the trials write the marker beside the experiment: not part of its code version
    (tmp_path / ".stowplanignore").write_text("executions.log\n")
    f = tmp_path / "sweep.toml"
    f.write_text(
        f"""
[experiment]
name = "crashy"

[[tasks]]
name = "work"
script = 'sleep {sleep}; echo "$STOWPLAN_RUN_ID" >> "$MARKER"'
env = {{ MARKER = "{marker}" }}
resources = {{ cpus = 1, memory = "64MiB" }}
sweep = {{ method = "grid", parameters = {{ i = {{ type = "int", low = 0, high = {n - 1} }} }} }}
"""
    )
    return f


def launches_per_key(state_dir: Path) -> dict[str, int]:
    """Launch count of every attempt directory, read from the launcher's own log."""
    out: dict[str, int] = {}
    for launches in (state_dir / "runs").glob("*/*/launches"):
        lines = [ln for ln in launches.read_text().splitlines() if ln.strip()]
        out[f"{launches.parent.parent.name}/{launches.parent.name}"] = len(lines)
    return out


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
