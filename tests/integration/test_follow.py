"""``stowplan run`` follows its runs without polling: the queue answers ``progress`` when the
counts change, or when the caller's wait is over (``QueueActor.progress``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from stowplan.actors.control import ControlPlane
from stowplan.provenance.store import RunStore
from stowplan.session import prepare, record, submissions

from .conftest import wait_for

pytestmark = pytest.mark.integration


def test_progress_waits_for_a_change_and_answers_it_at_once(
    ray_session: None, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "follow"\n[providers.local]\nkind = "local"\ncpus = 1\n'
    )
    (tmp_path / ".stowplanignore").write_text("go\n")  # not part of the code's identity
    f = tmp_path / "exp.toml"
    f.write_text(
        f"""
[experiment]
name = "follow"
[[tasks]]
name = "wait"
script = 'while [ ! -e "{go}" ]; do sleep 0.05; done'
resources = {{ cpus = 1, memory = "64MiB" }}
"""
    )
    prepared = prepare(f)
    with RunStore(prepared.store_path) as store:
        ids = [r.run_id for r in record(prepared, store)]
    plane = ControlPlane(
        state_dir=Path(prepared.state_dir),
        store_path=Path(prepared.store_path),
        providers=prepared.providers,
        poll_max=0.5,
    )
    plane.start()
    try:
        plane.submit(submissions(prepared, set(ids)), [])
        wait_for(lambda: plane.progress(ids)["counts"] == {"RUNNING": 1}, 60, "the run to start")
        counts = plane.progress(ids)["counts"]
        # nothing changes: the answer comes when the wait is over, with the same counts
        began = time.monotonic()
        info = plane.progress(ids, since=counts, wait=1.5)
        assert time.monotonic() - began >= 1.4
        assert info["counts"] == counts and info["fatal"] is None
        # counts other than the caller's: answered at once
        began = time.monotonic()
        assert plane.progress(ids, since={}, wait=30)["counts"] == counts
        assert time.monotonic() - began < 10
        # the run ends while the caller waits: answered then, long before the wait is over
        timer = threading.Timer(1.0, go.touch)
        timer.start()
        began = time.monotonic()
        info = plane.progress(ids, since=counts, wait=120)
        waited = time.monotonic() - began
        timer.join()
        assert waited < 60, waited
        # the first change may be a step on the way (the run's end is one report)
        wait_for(
            lambda: plane.progress(ids)["counts"] == {"SUCCEEDED": 1}, 60, "the run to succeed"
        )
        assert info["counts"] != counts
    finally:
        plane.stop()
