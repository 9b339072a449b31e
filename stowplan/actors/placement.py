"""The placement actor: runs the solver in its own worker process, so the queue never blocks."""

from __future__ import annotations

import contextlib
import time

import msgspec

from stowplan.actors.runtime import note_worker
from stowplan.actors.wire import pack, unpack
from stowplan.placement import PlacementProblem, solve


class PlacementActor:
    def __init__(
        self,
        seed: int = 0,
        *,
        budget: float | None = None,
        workers: int = 1,
        state_dir: str | None = None,
        owner: tuple[int, float] | None = None,
    ) -> None:
        note_worker(state_dir, "placement", owner)
        self.seed = seed
        self.budget = budget
        self.workers = workers

    def warm(self) -> None:
        """Import the solvers now (CP-SAT, about a second), not on the first placement. Called
        without waiting for an answer, so it never raises: a failure here is the first real
        solve's to report."""
        with contextlib.suppress(Exception):  # the solve that needs it reports it
            import stowplan.placement.cpsat
            import stowplan.placement.lp  # noqa: F401  (``solve`` imports them when needed)

    def solve(self, problem: bytes) -> bytes:
        started = time.perf_counter()
        sol = solve(
            unpack(problem, PlacementProblem),
            budget=self.budget,
            seed=self.seed,
            workers=self.workers,
        )
        # the solver never reads the clock; its shell times it
        return pack(msgspec.structs.replace(sol, solve_seconds=time.perf_counter() - started))
