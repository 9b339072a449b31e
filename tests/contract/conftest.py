"""The provider contract suite: every test in ``test_contract.py`` runs once per driver.

The ``harness`` fixture is parametrised over ``drivers.HARNESSES``; a case's id is the
driver's (``test_submit_is_idempotent[local]``). Cases of drivers that need a real service
(Slurm) carry the ``integration`` and ``slow`` marks and get their service from the session
fixture of ``tests/conftest.py``. A harness's ``known_bugs`` mark its failing
cases ``xfail(strict=True)``: fixing the driver makes them pass, which fails the suite until the
entry is removed. How to add a driver: see README.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.contract.drivers import HARNESSES, SlurmHarness
from tests.contract.harness import Harness

SERVICE_MARKS = {
    "slurm": (pytest.mark.integration, pytest.mark.slow),
    "kubernetes": (pytest.mark.integration,),  # the emulated API server, one per harness
}
"""Marks of the cases of drivers that need a real service started by the test session."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(
    params=[pytest.param(name, marks=SERVICE_MARKS.get(name, ())) for name in HARNESSES]
)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    name: str = request.param
    h: Harness
    if name == SlurmHarness.name:
        h = SlurmHarness(tmp_path, request.getfixturevalue("slurm_cluster"))
    else:
        h = HARNESSES[name](tmp_path)
    try:
        yield h
    finally:
        h.cleanup()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the cases a harness lists in ``known_bugs`` as strict expected failures."""
    here = Path(__file__).parent
    for item in items:
        callspec = getattr(item, "callspec", None)
        if not item.path.is_relative_to(here) or callspec is None:
            continue
        if "harness" not in callspec.params:
            continue
        cls = HARNESSES[callspec.params["harness"]]
        bug = cls.known_bugs.get(getattr(item, "originalname", item.name))
        if bug is not None:
            item.add_marker(pytest.mark.xfail(reason=f"{cls.name} bug: {bug}", strict=True))
