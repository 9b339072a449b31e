"""The placement actor: runs the solver in its own worker process, so the queue never blocks."""

from __future__ import annotations

from stowplan.actors.wire import pack, unpack
from stowplan.placement import PlacementProblem, solve


class PlacementActor:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def solve(self, problem: bytes) -> bytes:
        return pack(solve(unpack(problem, PlacementProblem), seed=self.seed))
