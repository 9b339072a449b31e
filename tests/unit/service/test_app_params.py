"""The API's and the dashboard's handlers declare their parameters in the style Litestar keeps
(``FromQuery``, ``FromPath``, ``QueryParameter``, ``PathParameter``): building the application
warns about none of them."""

from __future__ import annotations

import warnings
from pathlib import Path

from stowplan.provenance.store import RunStore
from stowplan.service.app import ServiceState, create_app
from stowplan.service.people import SERVICE_DB, People
from stowplan.session import project_paths
from stowplan.spec.loader import load_project

LAB = """
[project]
name = "lab"

[service.teams.vision]

[service.users.ada]
team = "vision"
role = "admin"
"""


def test_api_handlers_use_no_deprecated_parameter_style(tmp_path: Path) -> None:
    (tmp_path / "stowplan.toml").write_text(LAB)
    project = load_project(search_from=tmp_path)
    state_dir, store_path = project_paths(project)
    state_dir.mkdir(parents=True, exist_ok=True)
    with RunStore(store_path) as store, People(state_dir / SERVICE_DB) as people:
        state = ServiceState(project=project, state_dir=state_dir, store=store, people=people)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            app = create_app(state)
            assert app.openapi_schema is not None
    # every route: the API's and the dashboard's
    ours = [str(w.message) for w in caught if "deprecated" in str(w.message)]
    assert not ours, "\n".join(ours)
    ours = [str(w.message) for w in caught if "Parameter(query=" in str(w.message)]
    assert not ours, "\n".join(ours)
