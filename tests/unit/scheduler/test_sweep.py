"""Sweep expansion: grid cross products and seeded random / Sobol draws."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from stowplan.scheduler.sweep import expand
from stowplan.spec.loader import sweep_size
from stowplan.spec.models import LogUniform, Sweep


def sweep(**raw: Any) -> Sweep:
    return msgspec.convert(raw, Sweep)


MIXED = {
    "lr": {"type": "loguniform", "low": 1e-5, "high": 1e-1},
    "dropout": {"type": "uniform", "low": 0.1, "high": 0.5},
    "layers": {"type": "int", "low": 2, "high": 4},
    "opt": {"type": "choice", "values": ["adam", "sgd", "lion"]},
    "bs": [16, 32],
}


def test_no_sweep_is_one_empty_trial() -> None:
    assert expand(None) == [{}]


def test_grid_is_the_cross_product_in_declared_order() -> None:
    s = sweep(parameters={"C": [0.1, 1, 10], "gamma": [0.001, 0.01]})
    assert expand(s) == [
        {"C": 0.1, "gamma": 0.001},
        {"C": 0.1, "gamma": 0.01},
        {"C": 1, "gamma": 0.001},
        {"C": 1, "gamma": 0.01},
        {"C": 10, "gamma": 0.001},
        {"C": 10, "gamma": 0.01},
    ]


def test_grid_with_int_range_and_choice() -> None:
    s = sweep(
        parameters={
            "k": {"type": "int", "low": 1, "high": 3},
            "opt": {"type": "choice", "values": ["a", "b"]},
            "flag": [True],
        }
    )
    trials = expand(s)
    assert len(trials) == 6 == sweep_size(s)
    assert [t["k"] for t in trials] == [1, 1, 2, 2, 3, 3]
    assert [t["opt"] for t in trials] == ["a", "b"] * 3
    assert all(t["flag"] is True for t in trials)


def test_grid_ignores_the_seed() -> None:
    params = {"x": [1, 2, 3]}
    assert expand(sweep(parameters=params, seed=1)) == expand(sweep(parameters=params, seed=2))


@pytest.mark.parametrize("method", ["random", "sobol"])
def test_draws_are_deterministic_per_seed(method: str) -> None:
    a = expand(sweep(method=method, samples=16, seed=11, parameters=MIXED))
    b = expand(sweep(method=method, samples=16, seed=11, parameters=MIXED))
    c = expand(sweep(method=method, samples=16, seed=12, parameters=MIXED))
    assert len(a) == 16
    assert a == b
    assert a != c
    assert [t["lr"] for t in a] != [t["lr"] for t in c]


@pytest.mark.parametrize("method", ["random", "sobol"])
@pytest.mark.parametrize("seed", [0, 1, 2, 99])
def test_draws_stay_inside_their_domains(method: str, seed: int) -> None:
    trials = expand(sweep(method=method, samples=64, seed=seed, parameters=MIXED))
    assert len(trials) == 64
    for t in trials:
        assert list(t) == list(MIXED)
        assert isinstance(t["lr"], float) and 1e-5 <= t["lr"] <= 1e-1
        assert isinstance(t["dropout"], float) and 0.1 <= t["dropout"] < 0.5
        assert type(t["layers"]) is int and 2 <= t["layers"] <= 4
        assert t["opt"] in ("adam", "sgd", "lion")
        assert t["bs"] in (16, 32)


@pytest.mark.parametrize("method", ["random", "sobol"])
def test_draws_cover_each_domain(method: str) -> None:
    trials = expand(sweep(method=method, samples=128, seed=5, parameters=MIXED))
    # the int range is inclusive at both ends, and every choice is drawn
    assert {t["layers"] for t in trials} == {2, 3, 4}
    assert {t["opt"] for t in trials} == {"adam", "sgd", "lion"}
    assert {t["bs"] for t in trials} == {16, 32}
    # loguniform spreads over the decades, not linearly: about a quarter below 1e-4
    below = sum(1 for t in trials if float(t["lr"]) < 1e-4)
    assert 16 <= below <= 48
    logs = [math.log10(float(t["lr"])) for t in trials]
    assert min(logs) < -4.5 and max(logs) > -1.5


def test_sobol_is_balanced_for_powers_of_two() -> None:
    trials = expand(
        sweep(
            method="sobol",
            samples=64,
            seed=3,
            parameters={"u": {"type": "uniform", "low": 0.0, "high": 1.0}},
        )
    )
    # a scrambled Sobol sequence puts exactly one point in each of 64 equal bins
    bins = sorted(int(float(t["u"]) * 64) for t in trials)
    assert bins == list(range(64))


def test_sobol_uses_scipy_and_differs_from_random() -> None:
    from scipy.stats import qmc

    params = {"u": {"type": "uniform", "low": 0.0, "high": 1.0}}
    got = [t["u"] for t in expand(sweep(method="sobol", samples=8, seed=4, parameters=params))]
    want = qmc.Sobol(d=1, scramble=True, seed=4).random(8)[:, 0].tolist()
    assert got == pytest.approx(want)
    rnd = [t["u"] for t in expand(sweep(method="random", samples=8, seed=4, parameters=params))]
    assert rnd != got


def test_sobol_with_a_sample_count_that_is_not_a_power_of_two_does_not_warn() -> None:
    # pytest turns warnings into errors: scipy's balance warning must be handled inside
    params = {"u": {"type": "uniform", "low": 0.0, "high": 1.0}}
    assert len(expand(sweep(method="sobol", samples=10, seed=0, parameters=params))) == 10


def test_single_value_int_range() -> None:
    trials = expand(
        sweep(method="random", samples=5, parameters={"k": {"type": "int", "low": 7, "high": 7}})
    )
    assert [t["k"] for t in trials] == [7] * 5


@pytest.mark.parametrize("u", [0.0, 0.5, 1.0])
def test_loguniform_ends_stay_inside_despite_rounding(u: float) -> None:
    from stowplan.scheduler.sweep import _map

    # exp(log(1e-5)) is 9.999999999999997e-06 in floats
    v = _map(LogUniform(low=1e-5, high=1e-1), u)
    assert isinstance(v, float)
    assert 1e-5 <= v <= 1e-1


def test_repeat_numbers_count_earlier_trials_with_the_same_parameters() -> None:
    from stowplan.scheduler.sweep import repeat_numbers

    trials: list[dict[str, Any]] = [{"a": 1}, {"a": 2}, {"a": 1}, {"a": 1.0}, {"a": 1}, {}]
    # 1 and 1.0 are different parameters, as they are different run identities
    assert repeat_numbers(trials) == [0, 0, 1, 0, 2, 0]
    assert repeat_numbers([{}, {}]) == [0, 1]


def test_a_random_draw_over_few_values_repeats_parameter_sets() -> None:
    from stowplan.scheduler.sweep import repeat_numbers

    s = sweep(method="random", samples=9, seed=1, parameters={"a": [1, 2, 3]})
    trials = expand(s)
    assert len(trials) == 9
    assert max(repeat_numbers(trials)) > 0
