"""A run whose outputs the store could not keep never succeeds, and the others go on; what a
run imported is kept in the store with its attempt.

The store actor is swapped for a subclass, defined here, that cannot store one run's output
(as a full disk would refuse it); the real CLI runs on the test session's Ray. Before this was
fixed, the failure to store stopped the whole control plane (exit 3), after the run had
already been reported SUCCEEDED to the core.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from stowplan.actors.store import StoreActor
from stowplan.cli.main import main
from stowplan.provenance.imports import used_records
from stowplan.provenance.store import RunStore
from stowplan.spec.models import LocalProviderConfig

pytestmark = pytest.mark.integration

EXPERIMENT = """
[experiment]
name = "full-disk"
[[tasks]]
name = "write"
script = 'echo {i} > out.txt'
outputs = ["out.txt"]
resources = { cpus = 1, memory = "64MiB" }
retry = { max_attempts = 2, backoff = 0 }
sweep = { parameters = { i = [0, 1, 2] } }
[[tasks]]
name = "py"
command = ["python", "-c", "import json"]
resources = { cpus = 1, memory = "64MiB" }
"""

NO_SPACE = "out.txt: cannot be stored: [Errno 28] No space left on device"


class FullDiskForOne(StoreActor):
    """Cannot store the output of the run that wrote 1; stores everything else."""

    def store_outputs(self, outputs: dict[str, dict[str, str]]) -> dict[str, str]:
        bad = {
            rid
            for rid, files in outputs.items()
            if Path(files["out.txt"]).read_text().strip() == "1"
        }
        failed = super().store_outputs({r: f for r, f in outputs.items() if r not in bad})
        failed.update({rid: f"run {rid[:12]}: {NO_SPACE}" for rid in bad})
        return failed


@pytest.fixture(autouse=True)
def _by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray workers unpickle the subclass without importing this test module; the control
    plane starts it instead of the store actor."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # type: ignore[no-untyped-call]
    monkeypatch.setattr(sys.modules[StoreActor.__module__], StoreActor.__name__, FullDiskForOne)


def test_a_run_whose_outputs_were_not_stored_fails_and_is_retried(
    ray_session: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "f"\n[providers.local]\nkind = "local"\ncpus = 2\n'
    )
    f = tmp_path / "full-disk.toml"
    f.write_text(EXPERIMENT)
    monkeypatch.chdir(tmp_path)

    code = main(["run", str(f)])
    err = capsys.readouterr().err
    assert code == 1, err  # a run failed; the control plane did not
    assert "control plane" not in err, err

    state_dir = tmp_path / ".stowplan"
    with RunStore(state_dir / "stowplan.db") as store:
        every = store.runs_by_name("full-disk")
        runs = {r.params["i"]: r for r in every if r.task == "write"}
        arts = store.artifacts_for([r.run_id for r in runs.values()])
        attempts = store.attempts_for([runs[1].run_id])[runs[1].run_id]
        [py] = [r for r in every if r.task == "py"]
        [py_attempt] = store.attempts_for([py.run_id])[py.run_id]
        # the import record outlives the attempt directory
        shutil.rmtree(state_dir / "runs" / py.run_id)
        used = used_records(store, [py.run_id], {"local": LocalProviderConfig()}, state_dir)
    assert py.state == "SUCCEEDED" and py_attempt.used is not None, py_attempt
    v = sys.version_info
    assert [i.python for i in used[py.run_id].interpreters] == [f"{v.major}.{v.minor}.{v.micro}"]
    assert sorted(runs) == [0, 1, 2]
    for i in (0, 2):
        assert runs[i].state == "SUCCEEDED", runs[i]
        [art] = arts[runs[i].run_id]
        assert (art.name, Path(art.path).read_text()) == ("out.txt", f"{i}\n")
    bad = runs[1]
    assert (bad.state, bad.failure, bad.attempts) == ("FAILED", "node_failure", 2), bad
    assert NO_SPACE in bad.reason
    assert [(a.state, a.failure) for a in attempts] == [("FAILED", "node_failure")] * 2
    assert all(NO_SPACE in a.message for a in attempts), attempts
    assert bad.run_id not in arts
