"""What a task used of its environment: the import hook, reading its record, checking it now.

Distributions are made for real: a ``.dist-info`` directory with METADATA (and top_level.txt)
beside a module, in a temporary site directory put on the interpreter's path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stowplan.provenance.imports import (
    Change,
    InterpreterUse,
    UsedChecker,
    UsedRecord,
    read_used,
    summarize,
    used_differences,
)
from stowplan.providers.importhook import HOOK_DIR, USED_FILE, USED_FILE_ENV


def make_dist(site: Path, dist: str, version: str, module: str, *, top_level: bool) -> None:
    """A distribution ``dist`` providing module ``module`` (a package) in ``site``."""
    pkg = site / module
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(f"VERSION = {version!r}\n")
    for old in site.glob(f"{dist.replace('-', '_')}-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n\n")
    if top_level:
        (info / "top_level.txt").write_text(f"{module}\n")
    else:
        (info / "RECORD").write_text(f"{module}/__init__.py,,\n{info.name}/METADATA,,\n")


def run_hooked(
    tmp_path: Path, code: str, *pythonpath: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "task.py"
    script.write_text(code)
    full = {k: v for k, v in os.environ.items() if not k.startswith("STOWPLAN_")}
    full["PYTHONPATH"] = os.pathsep.join([HOOK_DIR, *pythonpath])
    full[USED_FILE_ENV] = str(tmp_path / USED_FILE)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    s = tmp_path / "site"
    s.mkdir()
    make_dist(s, "fancy-pkg", "1.0", "fancy", top_level=True)  # module name != dist name
    make_dist(s, "plainpkg", "2.0", "plainpkg", top_level=False)
    make_dist(s, "other-pkg", "3.0", "notused", top_level=True)
    return s


# -- the hook ----------------------------------------------------------------------------------


def test_hook_records_the_distributions_behind_the_imports(tmp_path: Path, site: Path) -> None:
    (tmp_path / "helper.py").write_text("X = 1\n")
    done = run_hooked(
        tmp_path,
        "import json, fancy, plainpkg, helper, msgspec\nprint('ran')\n",
        str(site),
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "ran\n", "")
    rec = read_used(tmp_path / USED_FILE)
    assert rec is not None
    (interp,) = rec.interpreters
    assert interp.executable == sys.executable
    assert interp.python == ".".join(map(str, sys.version_info[:3]))
    dists = interp.distributions
    assert dists["fancy-pkg"] == "1.0"  # through top_level.txt
    assert dists["plainpkg"] == "2.0"
    import msgspec

    assert dists["msgspec"] == msgspec.__version__
    assert "other-pkg" not in dists  # installed, never imported
    assert not any(n in dists for n in ("json", "helper"))  # stdlib and the task's own code
    raw = json.loads((tmp_path / USED_FILE).read_text())
    assert raw["modules"]["fancy"] == "fancy-pkg"


def test_hook_does_nothing_without_its_file_or_when_turned_off(tmp_path: Path, site: Path) -> None:
    done = run_hooked(tmp_path, "import fancy\n", str(site), env={"STOWPLAN_RECORD_IMPORTS": "0"})
    assert done.returncode == 0 and not (tmp_path / USED_FILE).exists()


def test_hook_chains_to_the_sitecustomize_it_shadows(tmp_path: Path, site: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['CHAINED'] = 'yes'\n")
    done = run_hooked(
        tmp_path,
        "import os, sys, sitecustomize\n"
        "print(os.environ.get('CHAINED'), sitecustomize.__file__,"
        f" any({HOOK_DIR!r} == p for p in sys.path))\n",
        str(other),
        str(site),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["yes", str(other / "sitecustomize.py"), "False"]
    assert read_used(tmp_path / USED_FILE) is not None


def test_hook_never_changes_how_a_task_ends(tmp_path: Path, site: Path) -> None:
    # the record cannot be written: the task's own exit status and output stand
    done = run_hooked(
        tmp_path,
        "import fancy, sys\nprint('out')\nsys.exit(3)\n",
        str(site),
        env={USED_FILE_ENV: str(tmp_path / "no" / "such" / "dir" / USED_FILE)},
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "")
    # a broken sitecustomize further down is reported by site, as without the hook
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text("raise RuntimeError('boom')\n")
    done = run_hooked(tmp_path, "import fancy\nprint('still runs')\n", str(broken), str(site))
    assert done.returncode == 0 and done.stdout == "still runs\n"
    assert "sitecustomize" in done.stderr and "boom" in done.stderr


def test_hook_appends_one_line_per_python_process(tmp_path: Path, site: Path) -> None:
    code = (
        "import subprocess, sys, fancy\n"
        "subprocess.run([sys.executable, '-c', 'import plainpkg'], check=True)\n"
    )
    assert run_hooked(tmp_path, code, str(site)).returncode == 0
    lines = (tmp_path / USED_FILE).read_text().splitlines()
    assert len(lines) == 2
    rec = read_used(tmp_path / USED_FILE)
    assert rec is not None and rec.distributions() == {"fancy-pkg": "1.0", "plainpkg": "2.0"}


# -- reading and checking ----------------------------------------------------------------------


def test_read_used_merges_processes_and_skips_torn_lines(tmp_path: Path) -> None:
    f = tmp_path / USED_FILE
    assert read_used(f) is None
    line = {"executable": "/py", "python": "3.12.1", "implementation": "CPython"}
    f.write_text(
        json.dumps({**line, "distributions": {"a": "1"}})
        + "\n"
        + json.dumps({**line, "distributions": {"b": "2"}})
        + "\n"
        + '{"executable": "/py", "distr'
    )
    assert read_used(f) == UsedRecord(
        interpreters=[
            InterpreterUse(
                executable="/py",
                implementation="CPython",
                python="3.12.1",
                distributions={"a": "1", "b": "2"},
            )
        ]
    )


def here(**dists: str) -> UsedRecord:
    v = sys.version_info
    return UsedRecord(
        interpreters=[
            InterpreterUse(
                executable=sys.executable,
                python=f"{v.major}.{v.minor}.{v.micro}",
                distributions=dists,
            )
        ]
    )


def test_checker_in_process_an_unrelated_install_changes_nothing(
    tmp_path: Path, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(site))
    rec = here(**{"fancy-pkg": "1.0"})
    assert UsedChecker().changes(rec) == []
    make_dist(site, "unrelated", "9.9", "unrelated", top_level=True)
    assert UsedChecker().changes(rec) == []
    make_dist(site, "fancy-pkg", "1.1", "fancy", top_level=True)
    assert UsedChecker().changes(rec) == [Change(name="fancy-pkg", was="1.0", now="1.1")]
    assert UsedChecker().now(rec) == {
        "fancy-pkg": "1.1",
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    gone = here(**{"never-installed": "1.0"})
    assert UsedChecker().changes(gone) == [Change(name="never-installed", was="1.0", now=None)]


def test_checker_asks_another_interpreter_once(tmp_path: Path, site: Path) -> None:
    other = tmp_path / "bin"
    other.mkdir()
    wrapper = other / "python"
    # another interpreter: this one, with the site directory on its path
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    rec = UsedRecord(
        interpreters=[
            InterpreterUse(
                executable=str(wrapper),
                python=".".join(map(str, sys.version_info[:3])),
                distributions={"fancy-pkg": "1.0", "plainpkg": "1.9"},
            )
        ]
    )
    check = UsedChecker()
    check.prefetch([rec])
    assert check.changes(rec) == [Change(name="plainpkg", was="1.9", now="2.0")]
    wrapper.unlink()  # cached: not asked again
    assert check.changes(rec) == [Change(name="plainpkg", was="1.9", now="2.0")]
    # gone interpreter
    assert UsedChecker().changes(rec) == [
        Change(name=f"python {wrapper}", was=rec.interpreters[0].python, now=None)
    ]


def test_summaries_and_differences() -> None:
    changes = [Change(name=f"p{i}", was="1", now="2") for i in range(5)]
    assert summarize(changes[:1]) == "p0 1 -> 2"
    assert summarize(changes) == "p0 1 -> 2, p1 1 -> 2, p2 1 -> 2 and 2 more"
    rec = here(a="1", b="2", c="3")
    assert used_differences(rec, ["a==1", "b==2.1", "zzz==0"]) == [
        "used package changed: b 2 -> 2.1",
        "used package missing: c==3",
    ]
    assert used_differences(None, {}) == []


def test_a_task_s_own_pythonpath_is_where_its_versions_are_looked_up(
    tmp_path: Path, site: Path
) -> None:
    # the site directory is on the task's path only, not on this process's
    assert str(site) not in sys.path
    assert run_hooked(tmp_path, "import fancy\n", str(site)).returncode == 0
    rec = read_used(tmp_path / USED_FILE)
    assert rec is not None and str(site) in rec.interpreters[0].path
    assert UsedChecker().changes(rec) == []
    make_dist(site, "fancy-pkg", "2.0", "fancy", top_level=True)
    assert UsedChecker().changes(rec) == [Change(name="fancy-pkg", was="1.0", now="2.0")]


def test_replay_compares_declared_and_captured(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stowplan.provenance.replay import captured_differences, environment_differences

    recorded = {"python": {"version": "3.12.1"}, "lock_files": {"uv.lock": "a", "old.lock": "b"}}
    now = {"python": {"version": "3.12.1"}, "lock_files": {"uv.lock": "c", "new.lock": "d"}}
    assert environment_differences(recorded, now) == [
        "declared: lock file new.lock is new",
        "declared: lock file old.lock is gone",
        "declared: lock file uv.lock changed",
    ]
    monkeypatch.syspath_prepend(str(site))
    rec = here(**{"fancy-pkg": "0.9", "plainpkg": "2.0", "gone-pkg": "1"})
    assert captured_differences(rec) == [
        "used package changed: fancy-pkg 0.9 -> 1.0",
        "used package gone: gone-pkg==1",
    ]
    assert captured_differences(None) == []


# -- where the record is kept ------------------------------------------------------------------


def test_used_records_come_from_the_store_and_else_from_the_attempt_directory(
    tmp_path: Path,
) -> None:
    """The record outlives the attempt directory (kept in the store with the attempt); an
    attempt recorded before the store kept records still has its file read."""
    import msgspec

    from stowplan.provenance.imports import used_records
    from stowplan.provenance.records import AttemptRecord
    from stowplan.provenance.store import RunStore
    from stowplan.spec.models import LocalProviderConfig
    from tests.unit.provenance.test_store import experiment, intent, run

    state_dir = tmp_path / ".stowplan"
    kept, old, none, failed = here(a="1"), here(b="2"), here(c="3"), here(d="4")
    with RunStore(state_dir / "stowplan.db") as store:
        e = experiment()
        store.put_experiment(e)
        runs = [run(e, i) for i in range(4)]
        store.put_runs(runs)
        intents = [intent(r) for r in runs]
        store.write_intents(intents)
        [h, hf] = store.put_used([msgspec.json.encode(kept), msgspec.json.encode(failed)])
        states = [("SUCCEEDED", h), ("SUCCEEDED", None), ("SUCCEEDED", None), ("FAILED", hf)]
        store.update_attempts(
            [
                AttemptRecord(
                    key=a.key, run_id="", attempt=0, provider="", pool="", state=s, used=u
                )
                for a, (s, u) in zip(intents, states, strict=True)
            ]
        )
        # the first run's attempt directory is gone; the second's was never in the store
        for r, rec in ((runs[1], old), (runs[2], none)):
            d = state_dir / "runs" / r.run_id / "1"
            d.mkdir(parents=True)
            if rec is old:
                (d / USED_FILE).write_text(
                    json.dumps(msgspec.to_builtins(rec.interpreters[0])) + "\n"
                )
        got = used_records(
            store, [r.run_id for r in runs], {"laptop": LocalProviderConfig()}, state_dir
        )
    assert got == {runs[0].run_id: kept, runs[1].run_id: old}
