"""One real local Ray for the whole integration session, and experiment projects in tmp dirs."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stowplan.actors.runtime import init_ray, shutdown_ray

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    started = init_ray(address=None, namespace="stowplan-tests", num_cpus=2)
    yield
    if started:
        shutdown_ray()


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
