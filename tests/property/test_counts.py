"""For any accepted experiment with sweeps: what a dry run counts is what is recorded is what
``status`` shows.

Sweeps are drawn to repeat parameter sets often (a grid listing a value twice, a random or
Sobol draw over two or three values), the case where trials used to collapse into fewer runs.
The dry run and ``status`` are the real commands; the store is real SQLite in a temporary
directory.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stowplan.cli.main import main
from stowplan.provenance.store import RunStore
from stowplan.session import prepare, record

VALUES = st.one_of(st.integers(-2, 2), st.sampled_from(["a", "b"]), st.booleans())


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return str(v)


@st.composite
def sweeps(draw: st.DrawFn) -> dict[str, Any] | None:
    kind = draw(st.sampled_from(["none", "grid", "random", "sobol"]))
    if kind == "none":
        return None
    names = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2, unique=True))
    params: dict[str, Any] = {}
    for n in names:
        shape = draw(st.sampled_from(["list", "choice", "int"]))
        if shape == "int":
            low = draw(st.integers(-2, 2))
            params[n] = {"type": "int", "low": low, "high": low + draw(st.integers(0, 2))}
        else:
            values = draw(st.lists(VALUES, min_size=1, max_size=3))
            params[n] = values if shape == "list" else {"type": "choice", "values": values}
    sweep: dict[str, Any] = {"method": kind, "parameters": params}
    if kind != "grid":
        sweep["samples"] = draw(st.integers(1, 9))
        sweep["seed"] = draw(st.integers(0, 2**31))
    return sweep


@st.composite
def experiments(draw: st.DrawFn) -> str:
    n = draw(st.integers(1, 3))
    lines = ['[experiment]\nname = "counts"\n']
    for i in range(n):
        sweep = draw(sweeps())
        args = [f"{{{p}}}" for p in (sweep or {}).get("parameters", {})]
        lines.append(f'[[tasks]]\nname = "t{i}"\ncommand = {_toml(["echo", *args])}\n')
        deps = draw(st.lists(st.integers(0, i - 1), unique=True)) if i else []
        if deps:
            lines.append(f"depends_on = {_toml([f't{d}' for d in deps])}\n")
        if sweep is not None:
            lines.append(f"sweep = {_toml(sweep)}\n")
    return "".join(lines)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=experiments())
def test_dry_run_count_is_recorded_count_is_status_count(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with tempfile.TemporaryDirectory(prefix="stowplan-counts-") as tmp:
        root = Path(tmp)
        (root / "stowplan.toml").write_text('[project]\nname = "p"\n')
        exp = root / "exp.toml"
        exp.write_text(text)

        capsys.readouterr()
        assert main(["run", str(exp), "--dry-run"]) == 0
        shown = re.search(r"counts: (\d+) runs?\b", capsys.readouterr().out)
        assert shown is not None
        dry_run = int(shown.group(1))

        prepared = prepare(exp)
        assert len(prepared.planned) == dry_run
        with RunStore(Path(prepared.store_path)) as store:
            record(prepared, store)
            recorded = store.runs_for_experiment(prepared.experiment.id)
        assert len(recorded) == dry_run

        assert main(["status", "--json", "counts", "--project-dir", str(root)]) == 0
        status = json.loads(capsys.readouterr().out)
        assert len(status) == dry_run
        assert {r["run_id"] for r in status} == {r.run_id for r in recorded}
