"""An exception in any actor of the control plane ends `stowplan run` with a clear error.

Each test swaps one actor class for a subclass, defined here, that raises where the real one
would fail (the placement solver, a store write, a provider's submit or watch loop, the queue's
handling of reports), and runs the real CLI on the test session's Ray. Before this was fixed,
the run waited forever. A transient failure (a provider's poll) is retried instead.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stowplan.actors.placement import PlacementActor
from stowplan.actors.provider import ProviderActor
from stowplan.actors.queue import QueueActor
from stowplan.actors.store import StoreActor
from stowplan.cli.main import main
from stowplan.providers.base import Report

pytestmark = pytest.mark.integration

EXPERIMENT = """
[experiment]
name = "faulty"
[[tasks]]
name = "t"
command = ["true"]
resources = { cpus = 1, memory = "64MiB" }
sweep = { parameters = { i = [0, 1] } }
"""


class FailingPlacement(PlacementActor):
    def solve(self, problem: bytes) -> bytes:
        raise OverflowError("cannot convert float infinity to integer")


class FailingStore(StoreActor):
    def update_attempts(self, updates: bytes) -> None:
        raise PermissionError(13, "Permission denied", "stowplan.db")


class FailingProvider(ProviderActor):
    async def submit(self, launches: bytes) -> bytes:
        raise RuntimeError("injected driver bug")


class FailingWatch(ProviderActor):
    async def _watch_loop(self, queue: Any) -> None:
        raise ZeroDivisionError("injected watch bug")


class FailingQueue(QueueActor):
    async def _on_reports(self, provider: str, reports: list[Report]) -> None:
        raise KeyError("injected core bug")


class FlakyPoll(ProviderActor):
    """Its first two polls fail like a dropped connection: retried, never fatal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        describe = self.driver.describe
        failures = [OSError("connection reset"), OSError("connection reset")]

        async def flaky(keys: Any) -> Any:
            if failures:
                raise failures.pop()
            return await describe(keys)

        self.driver.describe = flaky  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _by_value() -> None:
    """Ray workers unpickle these classes without importing this test module."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # type: ignore[no-untyped-call]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "f"\n[providers.local]\nkind = "local"\ncpus = 2\n'
    )
    (tmp_path / "faulty.toml").write_text(EXPERIMENT)
    return tmp_path / "faulty.toml"


CASES = [
    (FailingPlacement, "placement", "OverflowError"),
    (FailingStore, "store", "PermissionError"),
    (FailingProvider, "provider:local", "RuntimeError"),
    (FailingWatch, "provider:local", "ZeroDivisionError"),
    (FailingQueue, "queue", "KeyError"),
]


def _swap(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    """Make the control plane start ``cls`` instead of the actor class it derives from."""
    base = cls.__mro__[1]
    monkeypatch.setattr(sys.modules[base.__module__], base.__name__, cls)


@pytest.mark.parametrize(
    ("cls", "actor", "error"),
    CASES,
    ids=["placement", "store", "provider-submit", "provider-watch", "queue"],
)
def test_an_actor_exception_ends_the_run(
    ray_session: None,
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cls: type,
    actor: str,
    error: str,
) -> None:
    _swap(monkeypatch, cls)
    monkeypatch.chdir(project.parent)
    started = time.monotonic()
    code = main(["run", str(project)])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 3, err
    assert elapsed < 90, f"took {elapsed:.0f} s to notice"
    assert f"the control plane failed: the {actor} actor raised {error}" in err, err
    assert "Traceback" not in err and "\x1b[" not in err, err
    log = project.parent / ".stowplan" / "control-plane-error.log"
    assert error in log.read_text()


def test_a_failed_poll_is_retried_not_fatal(
    ray_session: None,
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _swap(monkeypatch, FlakyPoll)
    monkeypatch.chdir(project.parent)
    code = main(["run", str(project)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "control plane" not in err, err


class _Plane:
    """Stands in for ControlPlane in ``watch``: one error with Ray's colours, then done."""

    def progress(
        self, ids: list[str], *, since: dict[str, int] | None = None, wait: float = 0.0
    ) -> dict[str, Any]:
        error = "\x1b[36mray::PlacementActor.solve()\x1b[39m (pid=1): OverflowError"
        return {"counts": {"SUCCEEDED": len(ids)}, "errors": [error], "fatal": None}


def test_control_plane_errors_have_no_colour_codes_in_a_pipe() -> None:
    import io

    from rich.console import Console

    from stowplan.cli.control import watch

    out = io.StringIO()
    watch(_Plane(), ["a"], 1, time.monotonic(), Console(file=out))
    assert "control plane error: ray::PlacementActor.solve() (pid=1)" in out.getvalue()
    assert "\x1b" not in out.getvalue()
