"""The corpus of hostile inputs through the real CLI: exit 2, one paragraph, nothing written.

``tests/corpus/bad/`` holds one small file per reproducer (experiment files; ``project/``
holds stowplan.toml files, tried beside a valid experiment). Inputs too large to ship (deep
nesting, alias bombs, long chains) and special files (a FIFO) are made here. Every one goes
through ``stowplan run --dry-run FILE`` and must end with exit code 2 and one short paragraph on
stderr naming what is wrong, and leave no ``.stowplan`` behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from stowplan.cli.main import main

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "bad"
PROJECT = '[project]\nname = "bad"\n[providers.local]\nkind = "local"\ncpus = 2\n'
VALID = '[experiment]\nname = "ok"\n\n[[tasks]]\nname = "a"\ncommand = ["true"]\n'

EXPECT = {
    "backoff-inf.toml": "$.tasks[0].retry.backoff",
    "command-nul.toml": "$.tasks[0].command[1]",
    "cpus-1e308.toml": "1,048,576",
    "cpus-nan.toml": "$.tasks[0].resources.cpus",
    "dependency-cycle.toml": "dependency cycle",
    "env-key-newline.toml": "$.tasks[0].env",
    "experiment-name-newline.toml": "$.experiment.name",
    "experiment-seed-huge.yaml": "$.experiment.seed",
    "format-spec-placeholder.toml": "format specs",
    "gpus-10e30.yaml": "65,536",
    "huge-uniform-range.toml": "$.tasks[0].sweep.parameters.a",
    "inf-sweep-bounds.toml": "$.tasks[0].sweep.parameters.a.low",
    "input-missing.toml": "does not exist",
    "input-proc-self.toml": "/proc/self",
    "input-uri-newline.toml": "$.tasks[0].inputs[0].uri",
    "int-range-huge.yaml": "$.tasks[0].sweep.parameters.a.high",
    "max-concurrent-huge.toml": "$.tasks[0].sweep.max_concurrent",
    "memory-huge.toml": "1 EiB",
    "name-trailing-newline.toml": "$.tasks[0].name",
    "nan-parameter-value.toml": "$.tasks[0].sweep.parameters.a[1]",
    "not-utf8.toml": "UTF-8",
    "output-absolute.toml": "$.tasks[0].outputs[0]",
    "output-dotdot.toml": "$.tasks[0].outputs[0]",
    "output-empty-component.toml": "$.tasks[0].outputs[0]",
    "output-newline.toml": "$.tasks[0].outputs[0]",
    "output-nul.toml": "$.tasks[0].outputs[0]",
    "parameter-name-newline.toml": "$.tasks[0].sweep.parameters",
    "priority-huge.toml": "$.tasks[0].priority",
    "retry-on-cancelled.toml": "cancelled can never be retried",
    "samples-huge.toml": "10,000,000",
    "sweep-domain-bad.toml": "$.tasks[0].sweep.parameters.lr",
    "sweep-seed-negative.toml": "$.tasks[0].sweep.seed",
    "timeout-huge.toml": "10 years",
    "timeout-inf.toml": "$.tasks[0].timeout",
    "unknown-field-trials.toml": "did you mean 'samples'?",
    "unknown-suffix.txt": "unknown file type",
    "utf16.toml": "UTF-16",
    "yaml-billion-laughs.yaml": "aliases",
    "yaml-duplicate-key.yaml": "duplicate key 'name'",
}
PROJECT_EXPECT = {
    "link-bandwidth-inf.toml": "$.placement.links[0].bandwidth",
    "placement-budget-inf.toml": "$.placement.budget",
    "placement-budget-nan.toml": "$.placement.budget",
    "policy-priority-huge.toml": "$.policy.priority",
    "provider-cpus-inf.toml": "$.providers.local.cpus",
    "provider-gpus-huge.toml": "$.providers.local.gpus",
    "provider-kind-unknown.toml": "use one of: local, instant, slurm, kubernetes",
    "provider-name-newline.toml": "$.providers",
    "provider-port.toml": "$.providers.campus.port",
}
SESSION_NAMES_NO_FILE = {"input-missing.toml", "input-proc-self.toml"}
"""Data-input errors name the experiment file and line once session.py versions the
inputs with provenance.data.capture_inputs (see the issue 11 report)."""


def _chain(n: int, *, cycle: bool) -> str:
    parts = ['[experiment]\nname = "chain"\n']
    for i in range(n):
        # t0 needs t1 needs t2 ...: a depth-first walk in file order goes 5000 deep
        dep = i + 1 if i < n - 1 else (0 if cycle else None)
        extra = f'depends_on = ["t{dep}"]\n' if dep is not None else ""
        parts.append(f'[[tasks]]\nname = "t{i}"\ncommand = ["true"]\n{extra}')
    return "".join(parts)


def _flat_aliases() -> str:
    return (
        "big: &b " + "x" * 200_000 + "\nexperiment: {name: x}\ntasks:\n  - name: a\n"
        "    command: [e]\n    env:\n" + "".join(f"      V{i}: *b\n" for i in range(2000))
    )


GENERATED: dict[str, tuple[Callable[[], str], str]] = {
    "deep-100k.toml": (lambda: "a = " + "[" * 100_000 + "]" * 100_000 + "\n", "deeper than 32"),
    "deep-20k.yaml": (lambda: "a: " + "[" * 20_000 + "]" * 20_000 + "\n", "deeper than 32"),
    "alias-flat.yaml": (_flat_aliases, "aliases"),
    "chain-5000-cycle.toml": (lambda: _chain(5000, cycle=True), "dependency cycle"),
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "stowplan.toml").write_text(PROJECT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def refused(project: Path, capsys: pytest.CaptureFixture[str], file: Path) -> str:
    """Run the CLI on ``file``: exit 2, one paragraph on stderr, nothing written."""
    assert main(["run", "--dry-run", str(file)]) == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert err.startswith("stowplan: ") and "Traceback" not in err, err
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2 and all(line.strip() for line in lines), err
    assert len(lines) == 1 or lines[1].startswith("  fix: "), err
    assert len(err) < 1000, err
    assert not (project / ".stowplan").exists()
    return err


def test_the_corpus_is_what_the_tests_expect() -> None:
    assert {p.name for p in CORPUS.iterdir() if p.is_file()} == set(EXPECT)
    assert {p.name for p in (CORPUS / "project").iterdir()} == set(PROJECT_EXPECT)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_bad_experiment_files(project: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    shutil.copy(CORPUS / name, project / name)
    err = refused(project, capsys, project / name)
    assert EXPECT[name] in err
    assert f"stowplan: {project / name}" in err or f"stowplan: {name}" in err, err


@pytest.mark.parametrize("name", sorted(SESSION_NAMES_NO_FILE))
def test_data_input_errors_name_the_file_and_field(
    project: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    shutil.copy(CORPUS / name, project / name)
    err = refused(project, capsys, project / name)
    assert f"{name}:7 at $.tasks[0].inputs[0].uri" in err, err


@pytest.mark.parametrize("name", sorted(PROJECT_EXPECT))
def test_bad_project_files(project: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    shutil.copy(CORPUS / "project" / name, project / "stowplan.toml")
    (project / "ok.toml").write_text(VALID)
    err = refused(project, capsys, project / "ok.toml")
    assert PROJECT_EXPECT[name] in err and "stowplan.toml" in err


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_hostile_files(
    project: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    make, words = GENERATED[name]
    (project / name).write_text(make())
    assert words in refused(project, capsys, project / name)


def test_a_fifo_is_refused_not_waited_on(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(project / "exp.toml")
    assert "named pipe" in refused(project, capsys, project / "exp.toml")
    (project / "ok.toml").write_text(VALID)
    (project / "stowplan.toml").unlink()
    os.mkfifo(project / "stowplan.toml")
    assert "named pipe" in refused(project, capsys, project / "ok.toml")


def test_a_utf8_bom_is_accepted(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "bom.toml").write_bytes(b"\xef\xbb\xbf" + VALID.encode())
    assert main(["run", "--dry-run", "bom.toml"]) == 0
    assert "1 run" in capsys.readouterr().out
    assert not (project / ".stowplan" / "stowplan.db").exists()


def test_a_5000_task_chain_dry_runs(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "chain.toml").write_text(_chain(5000, cycle=False))
    assert main(["run", "--dry-run", "chain.toml"]) == 0
    assert "5000 runs" in capsys.readouterr().out
