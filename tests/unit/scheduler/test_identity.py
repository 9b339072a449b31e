"""Run identities from plan_runs: one run per trial, stable ids for unrepeated trials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from stowplan.scheduler.plan import EnvPin, Versions, plan_runs
from stowplan.spec.canonical import RunIdentity, canonical_json, sha256_hex
from stowplan.spec.loader import LoadedExperiment, load_experiment

VERSIONS = Versions(code_version="c" * 40, env_hash="e" * 64)


def load(tmp_path: Path, body: str) -> LoadedExperiment:
    f = tmp_path / "exp.toml"
    f.write_text('[experiment]\nname = "x"\nseed = 3\n' + body)
    (tmp_path / "stowplan.toml").write_text('[project]\nname = "p"\n')
    return load_experiment(f)


RANDOM_CHOICE = """
[[tasks]]
name = "t"
command = ["echo", "{a}"]
sweep = { method = "random", samples = 9, seed = 1, parameters = { a = [1, 2, 3] } }

[[tasks]]
name = "after"
command = ["echo"]
depends_on = ["t"]
"""


def test_random_samples_with_equal_parameters_are_distinct_runs(tmp_path: Path) -> None:
    planned = plan_runs(load(tmp_path, RANDOM_CHOICE), VERSIONS, project="p")
    trials = [r for r in planned if r.task == "t"]
    assert len(trials) == 9
    assert len({tuple(r.params.items()) for r in trials}) < 9  # the draw repeats values
    assert len({r.run_id for r in planned}) == len(planned) == 10
    (after,) = (r for r in planned if r.task == "after")
    assert sorted(after.depends_on) == sorted(r.run_id for r in trials)
    assert len(after.depends_on) == 9


def test_grid_with_a_repeated_value_gives_one_run_per_trial(tmp_path: Path) -> None:
    body = """
[[tasks]]
name = "t"
command = ["echo", "{a}", "{b}"]
sweep = { parameters = { a = [1, 2, 1], b = ["x", "x"] } }
"""
    planned = plan_runs(load(tmp_path, body), VERSIONS, project="p")
    assert len(planned) == 6
    assert len({r.run_id for r in planned}) == 6
    # the k-th repeat of a parameter set is trial k, in sweep order
    assert [r.identity.trial for r in planned] == [0, 1, 0, 1, 2, 3]


def test_unrepeated_trials_keep_the_identity_they_had_before_trial_numbers(
    tmp_path: Path,
) -> None:
    body = """
[[tasks]]
name = "t"
command = ["echo", "{a}"]
sweep = { parameters = { a = [1, 2, 1] } }
"""
    planned = plan_runs(load(tmp_path, body), VERSIONS, project="p")
    first, second, repeat = planned
    for r in (first, second):
        old = r.identity.__struct_fields__
        assert "trial" in old and r.identity.trial == 0
        fields = {k: getattr(r.identity, k) for k in old if k != "trial"}
        # the hash a store written before trial numbers holds for this run
        assert r.run_id == sha256_hex(canonical_json(fields))
    assert repeat.identity.trial == 1
    assert repeat.run_id == sha256_hex(canonical_json(repeat.identity))
    assert repeat.run_id != first.run_id


def test_identity_round_trips_through_its_stored_form(tmp_path: Path) -> None:
    planned = plan_runs(load(tmp_path, RANDOM_CHOICE), VERSIONS, project="p")
    for r in planned:
        stored = msgspec.to_builtins(r.identity)
        assert msgspec.convert(stored, RunIdentity).run_id() == r.run_id


@pytest.mark.parametrize("field", ["code_version", "env_hash"])
def test_every_version_is_in_the_identity(tmp_path: Path, field: str) -> None:
    loaded = load(tmp_path, RANDOM_CHOICE)
    a = plan_runs(loaded, VERSIONS, project="p")
    other = msgspec.structs.replace(VERSIONS, **{field: "z"})
    b = plan_runs(loaded, other, project="p")
    assert not {r.run_id for r in a} & {r.run_id for r in b}


def test_an_env_pin_changes_that_run_and_what_depends_on_it_only(tmp_path: Path) -> None:
    loaded = load(tmp_path, RANDOM_CHOICE)
    base = plan_runs(loaded, VERSIONS, project="p")
    pins = {(0, "t", 4): EnvPin(used={"numpy": "2.0.0"})}
    pinned = plan_runs(loaded, VERSIONS, project="p", env_pins=pins)
    changed = [(a.task, a.index) for a, b in zip(base, pinned, strict=True) if a.run_id != b.run_id]
    assert changed == [("t", 4), ("after", 0)]
    again = plan_runs(loaded, VERSIONS, project="p", env_pins=dict(pins))
    assert [r.run_id for r in again] == [r.run_id for r in pinned]


# -- through prepare: code versions, and the environment checked before reuse ------------------

QUICK = """
[[tasks]]
name = "train"
command = ["python", "{experiment_dir}/train.py", "{a}"]
sweep = { parameters = { a = [1, 2, 3] } }

[[tasks]]
name = "select"
command = ["python", "{experiment_dir}/select.py"]
depends_on = ["train"]
"""


def project(tmp_path: Path) -> Path:
    (tmp_path / "stowplan.toml").write_text('[project]\nname = "p"\n')
    (tmp_path / "train.py").write_text("print('train')\n")
    (tmp_path / "select.py").write_text("print('select')\n")
    exp = tmp_path / "exp.toml"
    exp.write_text('[experiment]\nname = "x"\n' + QUICK)
    return exp


def ids(exp: Path) -> list[str]:
    from stowplan.session import prepare

    return [r.run_id for r in prepare(exp).planned]


def test_outside_git_editing_a_script_gives_new_identities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    exp = project(tmp_path)
    from stowplan.session import prepare

    p = prepare(exp)
    assert p.provenance.code["version"].startswith("nogit.")
    assert p.provenance.code["tree"]["root"] == str(tmp_path.resolve())
    first = [r.run_id for r in p.planned]
    assert ids(exp) == first  # untouched: reused
    (tmp_path / ".stowplan" / "runs").mkdir(parents=True, exist_ok=True)
    (tmp_path / ".stowplan" / "runs" / "out.txt").write_text("state")  # stowplan's own files
    exp.write_text(exp.read_text() + "\n# a comment\n")  # the spec is hashed on its own
    assert ids(exp) == first
    (tmp_path / "train.py").write_text("print('train, fixed')\n")
    assert not set(ids(exp)) & set(first)


def test_inside_git_editing_a_script_gives_new_identities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    for k, v in {
        "HOME": str(tmp_path),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }.items():
        monkeypatch.setenv(k, v)
    repo = tmp_path / "repo"
    repo.mkdir()
    exp = project(repo)

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, timeout=30)

    git("init", "-q")
    (repo / ".gitignore").write_text(".stowplan/\n")
    git("add", "-A")
    git("commit", "-q", "-m", "one")
    first = ids(exp)
    assert ids(exp) == first
    (repo / "train.py").write_text("print('train, fixed')\n")  # uncommitted
    second = ids(exp)
    assert not set(second) & set(first)
    git("commit", "-q", "-am", "two")
    assert not set(ids(exp)) & (set(first) | set(second))


class FakeChecker:
    """Stands in for the interpreters: ``now`` is what is installed today."""

    def __init__(self, now: dict[str, str]) -> None:
        self.installed = now

    def prefetch(self, records: object) -> None:
        pass

    def changes(self, rec: Any) -> list[Any]:
        from stowplan.provenance.imports import Change

        return [
            Change(name=n, was=v, now=self.installed.get(n))
            for n, v in rec.distributions().items()
            if self.installed.get(n) != v
        ]

    def now(self, rec: Any) -> dict[str, str]:
        return {n: self.installed.get(n, "-") for n in rec.distributions()}


def used(**dists: str) -> Any:
    from stowplan.provenance.imports import InterpreterUse, UsedRecord

    return UsedRecord(interpreters=[InterpreterUse(executable="/py", distributions=dists)])


def test_recheck_reruns_runs_whose_imports_changed_and_then_reuses_the_rerun(
    tmp_path: Path,
) -> None:
    from stowplan.session import recheck_used

    loaded = load(tmp_path, QUICK)

    def replan(pins: Any) -> list[Any]:
        return plan_runs(loaded, VERSIONS, project="p", env_pins=pins)

    base = replan({})
    train = [r for r in base if r.task == "train"]
    store: dict[str, str] = {r.run_id: "SUCCEEDED" for r in base}
    records = {r.run_id: used(numpy="1.26.4") for r in train}
    records[base[-1].run_id] = used()  # select imports nothing

    def states(ids: list[str]) -> dict[str, str]:
        return {i: store[i] for i in ids if i in store}

    def used_of(ids: list[str]) -> dict[str, Any]:
        return {i: records[i] for i in ids if i in records}

    # an unrelated install: everything reused
    same, notes = recheck_used(base, replan, used_of, states, checker=FakeChecker(
        {"numpy": "1.26.4", "ipython": "8.0"}
    ))  # fmt: skip
    assert [r.run_id for r in same] == [r.run_id for r in base] and notes == []

    # numpy changed: every train run and select run again, with new identities
    check = FakeChecker({"numpy": "2.0.0"})
    again, notes = recheck_used(base, replan, used_of, states, checker=check)
    assert notes == ["re-running 3 runs: numpy 1.26.4 -> 2.0.0 changed since they ran"]
    assert not {r.run_id for r in again} & set(store)
    # ... they ran (with numpy 2.0.0) and were stored; the next invocation reuses them
    for r in again:
        store[r.run_id] = "SUCCEEDED"
        records[r.run_id] = used(numpy="2.0.0") if r.task == "train" else used()
    third, notes = recheck_used(base, replan, used_of, states, checker=FakeChecker(
        {"numpy": "2.0.0"}
    ))  # fmt: skip
    assert [r.run_id for r in third] == [r.run_id for r in again] and notes == []
    # back to the old version: the original runs are good again
    back, notes = recheck_used(base, replan, used_of, states, checker=FakeChecker(
        {"numpy": "1.26.4"}
    ))  # fmt: skip
    assert [r.run_id for r in back] == [r.run_id for r in base] and notes == []
