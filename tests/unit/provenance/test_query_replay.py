"""Queries and replay checks on a real store filled by the real session code (no Ray)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import msgspec
import pytest

from stowplan.errors import SpecError
from stowplan.provenance.imports import InterpreterUse, UsedRecord
from stowplan.provenance.query import (
    Filter,
    diff_is_empty,
    diff_runs,
    find_runs,
    lineage,
    load_view,
    parse_param_filter,
    reaches,
    readiness,
    replicate_summary,
    to_dot,
    tree_lines,
    used_changes,
)
from stowplan.provenance.records import ArtifactRecord, RunRecord
from stowplan.provenance.replay import (
    check_record,
    compare_outputs,
    environment_differences,
    plan_replay,
    replay_targets,
)
from stowplan.provenance.store import RunStore
from stowplan.session import prepare, record

EXPERIMENT = """\
[experiment]
name = "q"
[[tasks]]
name = "train"
command = ["python", "train.py", "{lr}"]
inputs = [{ uri = "data.csv" }]
outputs = ["metrics.json"]
sweep = { parameters = { lr = [0.001, 0.01, 0.1] } }
[[tasks]]
name = "pick"
command = ["python", "pick.py"]
depends_on = ["train"]
outputs = ["best.json"]
"""


@pytest.fixture
def filled(tmp_path: Path) -> tuple[RunStore, list[str]]:
    (tmp_path / "stowplan.toml").write_text('[project]\nname = "p"\n')
    (tmp_path / "data.csv").write_text("1,2\n")
    (tmp_path / "q.toml").write_text(EXPERIMENT)
    prepared = prepare(tmp_path / "q.toml")
    store = RunStore(prepared.store_path)
    record(prepared, store)
    ids = [r.run_id for r in prepared.planned]
    for i, rid in enumerate(ids):
        out = tmp_path / f"out{i}.json"
        out.write_text(json.dumps({"acc": 0.5 + i / 10}))
        store.put_artifacts(rid, {"best.json" if i == 3 else "metrics.json": str(out)})
    return store, ids


def test_find_by_param_data_artifact(filled: tuple[RunStore, list[str]]) -> None:
    store, ids = filled
    got = find_runs(store, Filter(params=[parse_param_filter("lr>0.005")]))
    assert {r.run_id for r in got} == set(ids[1:3])  # runs created together: by run id
    data = store.get_runs([ids[0]])[ids[0]].identity["data_versions"]["data.csv"]
    assert {r.run_id for r in find_runs(store, Filter(data=data[7:20]))} == set(ids[:3])
    (sha,) = [a.sha256 for a in store.artifacts_for([ids[3]])[ids[3]]]
    assert [r.run_id for r in find_runs(store, Filter(artifact=sha[:8]))] == [ids[3]]
    assert find_runs(store, Filter(params=[parse_param_filter('lr="x"')])) == []
    assert find_runs(store, Filter(gpu="H100")) == []
    for bad in ("lr", "lr>>1", ">1", "lr>"):
        with pytest.raises(SpecError):
            parse_param_filter(bad)
    store.close()


def test_lineage_up_and_down(filled: tuple[RunStore, list[str]]) -> None:
    store, ids = filled
    (best,) = store.artifacts_for([ids[3]])[ids[3]]
    g = lineage(store, best.sha256[:10])
    got = reaches(g)
    assert got["run"] == sorted(f"run:{i}" for i in ids)
    assert len(got["data"]) == 1 and got["data"][0].startswith("data:data.csv@sha256:")
    assert len(got["artifact"]) == 4
    one = lineage(store, best.sha256, depth=1)
    assert reaches(one)["run"] == [f"run:{ids[3]}"]
    down = lineage(store, ids[0], direction="down")
    assert reaches(down)["run"] == sorted([f"run:{ids[0]}", f"run:{ids[3]}"])
    text = "\n".join(tree_lines(g))
    assert "[data] data.csv" in text and text.count("[run]") >= 4
    assert to_dot(g).count("->") == len(g.edges)
    with pytest.raises(SpecError):
        lineage(store, "zzzz")
    store.close()


def test_diff_names_what_changed(filled: tuple[RunStore, list[str]]) -> None:
    store, ids = filled
    d = diff_runs(store, load_view(store, ids[0]), load_view(store, ids[1]))
    assert d["params"] == [{"field": "params.lr", "a": 0.001, "b": 0.01}]
    assert d["code"]["fields"] == [] and d["data"] == [] and d["hardware"] == []
    assert d["packages"] == {"added": [], "removed": [], "changed": []}
    assert [o["name"] for o in d["outputs"]] == ["metrics.json"]
    store.close()


def test_diff_of_a_run_with_inputs_and_params_and_one_without(
    filled: tuple[RunStore, list[str]],
) -> None:
    """A side that has none is shown as what it is ({} or []), in one change at the field
    itself: never ``params: null -> {}`` beside ``params.lr: 0.001 -> null``."""
    store, ids = filled
    d = diff_runs(store, load_view(store, ids[0]), load_view(store, ids[3]))
    assert d["params"] == [{"field": "params", "a": {"lr": 0.001}, "b": {}}]
    by_field = {c["field"]: c for c in d["spec"]}
    inputs = by_field["$.task.inputs"]
    assert [i["uri"] for i in inputs["a"]] == ["data.csv"] and inputs["b"] == []
    assert by_field["$.task.sweep"]["b"] is None
    assert not any(f.startswith(("$.task.inputs[", "$.task.sweep.")) for f in by_field)
    for c in d["params"] + d["spec"]:  # no change says a side is missing where it is empty
        assert not (c["a"] is None and c["b"] in ({}, [])), c
        assert not (c["b"] is None and c["a"] in ({}, [])), c
    # one field of a list of tables: the path goes down to that field
    a, b = load_view(store, ids[0]), load_view(store, ids[1])
    assert diff_runs(store, a, b)["spec"] == []
    store.close()


def test_check_record_passes_then_catches_edits(filled: tuple[RunStore, list[str]]) -> None:
    store, ids = filled
    for rid in ids:
        check_record(store, load_view(store, rid))
    c = sqlite3.connect(store.path, isolation_level=None)
    (rec,) = c.execute("SELECT record FROM provenance").fetchone()
    prov = json.loads(rec)
    prov["hardware"]["hostname"] = "elsewhere"
    c.execute("UPDATE provenance SET record = ?", (json.dumps(prov),))
    with pytest.raises(SpecError, match="provenance record no longer hashes"):
        check_record(store, load_view(store, ids[0]))
    c.execute("UPDATE provenance SET record = ?", (rec,))
    (spec,) = c.execute("SELECT spec FROM experiments").fetchone()
    c.execute("UPDATE experiments SET spec = ?", (spec.replace("pick.py", "evil.py"),))
    with pytest.raises(SpecError, match="experiment's spec"):
        check_record(store, load_view(store, ids[3]))
    c.close()
    store.close()


def test_plan_replay_refuses_before_anything_is_checked_out(
    filled: tuple[RunStore, list[str]], tmp_path: Path
) -> None:
    """The replay's decisions need no CLI and no Ray: a provider not configured, an upstream
    run that did not succeed, code git did not track: each a SpecError naming why."""
    from stowplan.spec.loader import load_project

    store, ids = filled
    project = load_project(search_from=tmp_path)
    assert replay_targets(store, [ids[1][:12], ids[1], ids[0]]) == [ids[1], ids[0]]
    with pytest.raises(SpecError, match="neither a run id nor an experiment"):
        replay_targets(store, ["nosuch"])
    with pytest.raises(SpecError, match="--provider 'gpu' is not configured") as e:
        plan_replay(project, [ids[0]], provider="gpu")
    assert e.value.path == "$.providers"
    with pytest.raises(SpecError, match=f"upstream run {min(ids[:3])[:12]} did not succeed"):
        plan_replay(project, [ids[3]])  # pick reads what the train runs have not made yet
    with pytest.raises(SpecError, match="code that git did not track"):
        plan_replay(project, [ids[0]])
    store.close()


def art(name: str, sha: str, path: Path) -> ArtifactRecord:
    return ArtifactRecord(run_id="r", name=name, sha256=sha, size=0, path=str(path))


def test_compare_outputs(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"acc": 0.9100, "n": 3, "tag": "x"}))
    b.write_text(json.dumps({"acc": 0.9104, "n": 3, "tag": "x"}))
    same = compare_outputs([art("m", "1" * 64, a)], [art("m", "1" * 64, b)])
    assert [(o.same, o.how) for o in same] == [(True, "identical")]
    bits = compare_outputs([art("m", "1" * 64, a)], [art("m", "2" * 64, b)])
    assert [(o.same, o.how) for o in bits] == [(False, "differs")]
    tol = compare_outputs([art("m", "1" * 64, a)], [art("m", "2" * 64, b)], tolerance=1e-3)
    assert [(o.same, o.how) for o in tol] == [(True, "within tolerance")]
    tight = compare_outputs(
        [art("m", "1" * 64, a)], [art("m", "2" * 64, b)], tolerances={"acc": 1e-5}
    )
    assert not tight[0].same and "acc" in tight[0].details[0]
    gone = compare_outputs([art("m", "1" * 64, a)], [art("n", "1" * 64, a)])
    assert [(o.name, o.how) for o in gone] == [("m", "missing"), ("n", "extra")]


def test_environment_differences() -> None:
    rec = {"python": {"version": "3.11.7"}, "distributions": ["a==1", "b==2", "c==3"]}
    now = {"python": {"version": "3.11.9"}, "distributions": ["a==1", "b==2.1", "d==4"]}
    assert environment_differences(rec, now) == [
        "python 3.11.7 -> 3.11.9",
        "package added: d==4",
        "package removed: c==3",
        "package changed: b 2 -> 2.1",
    ]
    assert environment_differences(rec, msgspec.to_builtins(rec)) == []


def _replicates(tmp_path: Path) -> tuple[list[RunRecord], dict[str, list[ArtifactRecord]]]:
    """Two replicates of one trial whose task writes its categorical C back beside its
    metrics, and two replicates of a trial whose runs (a random sweep) got different C."""
    runs, arts = [], {}
    rows = [
        (0, {"C": 10}, 0, {"C": 10, "acc": 0.5, "kernel": "rbf", "ok": True}),
        (0, {"C": 10}, 1, {"C": 10, "acc": 0.7, "kernel": "rbf", "ok": True}),
        (1, {"C": 1}, 0, {"C": 1, "acc": 0.2, "loss": float("nan")}),
        (1, {"C": 10}, 1, {"C": 10, "acc": 0.4}),
    ]
    for n, (index, params, rep, out) in enumerate(rows):
        rid = f"{n:064x}"
        runs.append(
            RunRecord(
                run_id=rid, experiment_id="e", experiment="x", task="fit", index=index,
                params=params, seed=rep, replicate=rep, depends_on=[], identity={},
                task_spec={}, provenance="p", state="SUCCEEDED",
            )
        )  # fmt: skip
        f = tmp_path / f"{n}.json"
        f.write_text(json.dumps(out))
        arts[rid] = [
            ArtifactRecord(run_id=rid, name="metrics.json", sha256="0", size=1, path=str(f))
        ]
    return runs, arts


def test_replicates_summarise_metrics_only(tmp_path: Path) -> None:
    runs, arts = _replicates(tmp_path)
    first, *rest = replicate_summary(runs, arts)
    assert set(first["metrics"]) == {"acc"}  # not C (a parameter), kernel or ok
    assert first["metrics"]["acc"]["mean"] == pytest.approx(0.6)
    assert first["params"] == {"C": 10} and first["replicates"] == 2
    # runs of one index with different parameters are never averaged together
    assert [(s["params"], s["replicates"]) for s in rest] == [({"C": 1}, 1), ({"C": 10}, 1)]
    assert set(rest[0]["metrics"]) == {"acc"}  # a NaN is not a measurement either


class _Run(msgspec.Struct, frozen=True):
    run_id: str
    task: str
    depends_on: list[str]


def test_readiness_places_only_runs_whose_upstream_succeeded() -> None:
    train = [_Run(f"t{i}", "train", []) for i in range(3)]
    pick = _Run("p", "pick", ["t0", "t1", "t2"])
    report = _Run("r", "report", ["p", "elsewhere-0123456789"])
    runs = [*train, pick, report]
    nothing = readiness(runs, {})
    assert nothing.ready == ["t0", "t1", "t2"] and nothing.reused == []
    assert {w.run_id: w.on for w in nothing.waiting} == {
        "p": {"train": ["t0", "t1", "t2"]},
        "r": {"pick": ["p"], "elsewhere-01": ["elsewhere-0123456789"]},
    }
    some = readiness(runs, {"t0": "SUCCEEDED", "t1": "RUNNING"})
    assert some.ready == ["t1", "t2"] and some.reused == ["t0"]
    assert some.waiting[0].on == {"train": ["t1", "t2"]}
    done = readiness(runs, {"t0": "SUCCEEDED", "t1": "SUCCEEDED", "t2": "SUCCEEDED"})
    assert done.ready == ["p"] and [w.run_id for w in done.waiting] == ["r"]


def _used(**dists: str) -> UsedRecord:
    return UsedRecord(
        interpreters=[InterpreterUse(executable="/usr/bin/python3", distributions=dists)]
    )


def test_diff_names_the_imported_packages_whose_versions_differ(
    filled: tuple[RunStore, list[str]],
) -> None:
    store, ids = filled
    a, b = load_view(store, ids[0]), load_view(store, ids[0])
    assert used_changes(
        _used(numpy="1.26.4", six="1.16.0"), _used(numpy="2.0.0", attrs="23.1")
    ) == [
        {"package": "attrs", "a": None, "b": "23.1"},
        {"package": "numpy", "a": "1.26.4", "b": "2.0.0"},
        {"package": "six", "a": "1.16.0", "b": None},
    ]
    # one side captured nothing: nothing is known to compare
    assert used_changes(_used(numpy="1.26.4"), None) == []
    same = diff_runs(store, a, b)
    assert same["used"] == [] and diff_is_empty(same)
    rid = ids[0]
    b2 = load_view(store, ids[1])
    d = diff_runs(store, a, b2, used={rid: _used(numpy="1.26.4"), ids[1]: _used(numpy="2.0.0")})
    assert d["used"] == [{"package": "numpy", "a": "1.26.4", "b": "2.0.0"}]
    # the same run on both sides: the same record, nothing differs
    assert diff_runs(store, a, b, used={rid: _used(numpy="1.26.4")})["used"] == []
    only_used = {**same, "used": [{"package": "numpy", "a": "1", "b": "2"}]}
    assert not diff_is_empty(only_used)
    store.close()
