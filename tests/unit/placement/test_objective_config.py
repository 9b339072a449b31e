"""``[placement] objective`` in stowplan.toml: fgd by default, bestfit on request, a typo named."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.errors import SpecError
from stowplan.spec.loader import load_project


def project(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stowplan.toml"
    path.write_text(text)
    return path


def test_the_default_is_fgd(tmp_path: Path) -> None:
    assert load_project(project(tmp_path, "")).config.placement.objective == "fgd"


def test_bestfit_can_be_chosen(tmp_path: Path) -> None:
    loaded = load_project(project(tmp_path, '[placement]\nobjective = "bestfit"\n'))
    assert loaded.config.placement.objective == "bestfit"


def test_an_unknown_objective_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as e:
        load_project(project(tmp_path, '[placement]\nobjective = "tetris"\n'))
    assert e.value.path == "$.placement.objective"
    assert "fgd" in str(e.value) and "bestfit" in str(e.value)
