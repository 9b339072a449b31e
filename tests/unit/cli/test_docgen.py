"""docs/reference.md is generated from the schema: it fails here when it is out of date."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from stowplan.cli import docgen
from stowplan.spec import models

REPO = Path(__file__).resolve().parents[3]


def test_the_reference_is_up_to_date() -> None:
    assert docgen.OUTPUT == REPO / "docs" / "reference.md"
    current = docgen.OUTPUT.read_text() if docgen.OUTPUT.exists() else ""
    assert current == docgen.render(), (
        "docs/reference.md is out of date: run `python -m stowplan.cli.docgen`"
    )


def test_every_field_of_every_spec_struct_is_in_it() -> None:
    text = docgen.render()
    _, defs = msgspec.json.schema_components([models.Experiment, models.ProjectConfig])
    for name, schema in defs.items():
        assert f"### {name}\n" in text, name
        for field in schema.get("properties", {}):
            assert f"| `{field}` |" in text, f"{name}.{field}"


def test_every_variable_a_task_gets_is_documented() -> None:
    text = docgen.render()
    code = "\n".join(
        p.read_text()
        for d in ("providers", "actors", "session.py")
        for p in (REPO / "stowplan").glob(d if d.endswith(".py") else f"{d}/**/*.py")
    )
    # what stowplan sets in a task's environment: env["STOWPLAN_X"] = or "STOWPLAN_X": in a dict
    set_for_tasks = set(re.findall(r"""env\["(STOWPLAN_\w+)"\]\s*=""", code))
    set_for_tasks |= set(re.findall(r""""(STOWPLAN_\w+)":\s""", code))
    set_for_tasks |= set(re.findall(r"export (STOWPLAN_\w+)=", code))
    assert {"STOWPLAN_UPSTREAM", "STOWPLAN_RUN_ID", "STOWPLAN_ATTEMPT_DIR"} <= set_for_tasks
    for var in sorted(set_for_tasks):
        assert f"`{var}`" in text, f"{var} is set for tasks but not in docs/reference.md"


def test_check_mode_says_when_the_file_is_stale(tmp_path: Path) -> None:
    out = tmp_path / "reference.md"
    assert docgen.main(["--check", "--output", str(out)]) == 1
    assert docgen.main(["--output", str(out)]) == 0
    assert docgen.main(["--check", "--output", str(out)]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    assert docgen.main(["--check", "--output", str(out)]) == 1
