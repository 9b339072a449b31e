"""The quickstart, end to end on real local Ray, SQLite and subprocesses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stowplan.actors.wire import unpack
from stowplan.cli.main import main
from stowplan.placement import PlacementProblem, PlacementSolution, solve
from stowplan.provenance.store import RunStore

pytestmark = pytest.mark.integration


def test_quickstart_runs_then_reuses(
    ray_session: None, quickstart: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chdir(quickstart.parent.parent)
    assert main(["run", str(quickstart)]) == 0
    out = capsys.readouterr()
    assert "train" in out.out and "accuracy" in out.out

    db = quickstart.parent.parent / ".stowplan" / "stowplan.db"
    with RunStore(db) as store:
        exps = store.list_experiments()
        assert [e.name for e in exps] == ["digits-svm"]
        runs = store.runs_for_experiment(exps[0].id)
        assert len(runs) == 25
        assert {r.state for r in runs} == {"SUCCEEDED"}
        train = [r for r in runs if r.task == "train"]
        assert len({(r.params["C"], r.params["gamma"]) for r in train}) == 24
        select = next(r for r in runs if r.task == "select")
        assert sorted(select.depends_on) == sorted(r.run_id for r in train)
        arts = store.artifacts_for([select.run_id])[select.run_id]
        best = json.loads(Path(arts[0].path).read_text())
        assert best["trials"] == 24
        accs = []
        for r in train:
            (a,) = store.artifacts_for([r.run_id])[r.run_id]
            accs.append(json.loads(Path(a.path).read_text())["accuracy"])
        assert best["accuracy"] == max(accs)
        attempts = store.attempts_for([r.run_id for r in runs])
        assert all(len(v) == 1 for v in attempts.values())
        # each attempt carries the placement that chose it, re-derivable from the stored inputs
        for r in runs:
            (pl,) = store.placements_for(r.run_id)
            assert (pl.attempt, pl.pool, pl.provider) == (1, "local", "local")
            assert pl.status in ("OPTIMAL", "FEASIBLE", "GREEDY_FALLBACK")
            assert pl.hardware_class.startswith("cpu=")
            problem, solution = unpack(
                store.get_blob(pl.problem), tuple[PlacementProblem, PlacementSolution]
            )
            assert solution.request_id == pl.request_id
            assert any(r.run_id in c.members for c in problem.classes)
            assert solve(problem).fingerprint() == solution.fingerprint()

    # the same experiment again: every run is found, nothing is started
    assert main(["run", str(quickstart), "--json"]) == 0
    again = capsys.readouterr()
    assert "25 of 25 runs reused" in again.err
    status = json.loads(again.out)
    assert status["reused"] == 25 and status["counts"] == {"SUCCEEDED": 25}
    with RunStore(db) as store:
        attempts = store.attempts_for([r.run_id for r in runs])
        assert all(len(v) == 1 for v in attempts.values())
