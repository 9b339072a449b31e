"""The relaxation (whole, restricted with column generation, priced bound) and the CP-SAT
neighbourhood search used for large placements."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stowplan.placement.cpsat as cpsat
import stowplan.placement.lp as lp
from stowplan.placement import PlacementStatus, solve
from stowplan.placement.greedy import place_greedy
from stowplan.placement.solution import objective_int, violations
from stowplan.placement.synthetic import problem as synthetic
from stowplan.placement.table import build, lower_bound

from .test_solve import shuffled


@pytest.fixture(scope="module")
def optimum() -> tuple[object, int]:
    """A problem CP-SAT solves to proven optimality, and that optimum."""
    p = synthetic(600, 25, 8, seed=11)
    sol = solve(p, budget=30.0)
    assert sol.status is PlacementStatus.OPTIMAL
    return p, int(sol.objective)


def test_the_whole_relaxation_bounds_the_optimum_and_rounds_to_a_feasible_start(
    optimum: tuple[object, int],
) -> None:
    p, best = optimum
    table = build(p)  # type: ignore[arg-type]
    hint, _ = place_greedy(table)
    r = lp.relax(table, hint)
    assert r is not None and r.rounds == 1
    assert r.bound <= best
    assert r.bound >= lower_bound(table)  # never weaker than ignoring capacity
    assert r.objective <= best + 1  # the LP optimum is a relaxation of the same problem
    assert not violations(table, r.counts, r.launched)
    filled, launched = place_greedy(table, r.counts, r.launched)
    assert not violations(table, filled, launched)


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(0.0, 3.0), seed=st.integers(0, 2**31 - 1))
def test_any_row_prices_give_a_valid_bound(scale: float, seed: int) -> None:
    # L(y) is a bound for every y >= 0, not only the LP's duals: check it against the optimum
    p = synthetic(600, 25, 8, seed=11)
    table = build(p)
    rows = lp._layout(table)
    b = lp._rhs(table, rows)
    rng = np.random.default_rng(seed)
    unit = max(table.reward) / max(1.0, float(np.max(np.array(table.need, dtype=float))))
    y = rng.random(rows.count) * scale * unit * (rng.random(rows.count) < 0.3)
    bound, _ = lp._price(table, rows, b, y)
    sol = solve(p, budget=30.0)
    assert sol.status is PlacementStatus.OPTIMAL
    assert bound <= sol.objective + 1e-6 * abs(sol.objective)


def test_column_generation_reaches_the_whole_relaxation(monkeypatch: pytest.MonkeyPatch) -> None:
    p = synthetic(4000, 120, 30, seed=5)
    table = build(p)
    hint, _ = place_greedy(table)
    whole = lp.relax(table, hint)
    assert whole is not None
    monkeypatch.setattr(lp, "FULL_COLUMNS", 10)
    monkeypatch.setattr(lp, "START_CHEAPEST", 2)
    monkeypatch.setattr(lp, "START_PER_POOL", 1)
    one = lp.relax(table, hint, rounds=1)
    many = lp.relax(table, hint, rounds=50)
    assert one is not None and many is not None
    total = sum(len(c) for c in table.columns)
    assert one.columns < many.columns < total  # it needed more columns, not all of them
    assert one.rounds == 1 and 1 < many.rounds < 50  # it stopped: nothing left prices negative
    # every bound is valid; the converged one is the whole relaxation's optimum
    assert one.bound <= whole.bound + 1
    assert many.bound == pytest.approx(whole.bound, rel=1e-9)
    assert many.objective == pytest.approx(whole.objective, rel=1e-9)
    assert not violations(table, many.counts, many.launched)


def test_the_neighbourhood_moves_only_the_classes_it_frees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = synthetic(3000, 80, 24, seed=9)
    table = build(p)
    hint, launched = place_greedy(table)
    r = lp.relax(table, hint)
    assert r is not None
    monkeypatch.setattr(cpsat, "MAX_COLUMNS", 60)
    free = cpsat.neighbourhood(table, hint, r.values)
    assert free is not None
    moving = {ci for ci, ks in enumerate(free) if ks}
    assert moving and len(moving) < len(table.classes)
    assert sum(len(ks) for ks in free) <= 60
    res = cpsat.solve_cpsat(table, hint, launched, free=free, budget=2.0, seed=0, workers=1)
    assert res.status in ("OPTIMAL", "FEASIBLE") and res.restricted
    assert not violations(table, res.counts, res.launched)
    assert res.objective == objective_int(table, res.counts, res.launched)
    assert res.objective <= objective_int(table, hint, launched)
    for key, n in hint.items():
        if key[0] not in moving:
            assert res.counts.get(key, 0) == n
    for key, n in res.counts.items():
        if key[0] not in moving:
            assert hint.get(key, 0) == n


def test_a_large_placement_is_deterministic_and_uses_the_relaxation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the paths of a 10^5-task placement, at a size a test can afford
    monkeypatch.setattr(lp, "FULL_COLUMNS", 200)
    monkeypatch.setattr(lp, "START_CHEAPEST", 3)
    monkeypatch.setattr(cpsat, "MAX_COLUMNS", 150)
    p = synthetic(5000, 150, 40, seed=3)
    first = solve(p)
    assert first.status in (PlacementStatus.FEASIBLE, PlacementStatus.OPTIMAL)
    assert first.bound <= first.objective
    prints = {solve(p).fingerprint(), solve(shuffled(p, 2)).fingerprint(), first.fingerprint()}
    assert len(prints) == 1
    greedy_only = solve(p, budget=0.0)
    assert first.objective <= greedy_only.objective
