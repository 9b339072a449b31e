"""Expanding a sweep into trials: grid cross products, seeded random and Sobol draws.

The same sweep and seed give the same trials, in the same order, on every machine. Random
draws use numpy's PCG64 generator; Sobol points come from scipy's ``qmc.Sobol`` (scrambled,
seeded), mapped onto each parameter's domain. A plain value list in a random or Sobol sweep is
a choice among its values.

Trials may repeat a parameter set (a random draw over a few discrete values, a grid that lists a
value twice). Each trial is still its own run: :func:`repeat_numbers` numbers the repeats, and
the number goes into the run's identity, so counts agree everywhere (a sample replicated by
the draw is a replicate the user asked for).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from stowplan.spec.canonical import canonical_json
from stowplan.spec.models import Choice, IntRange, LogUniform, Scalar, Sweep, Uniform

Params = dict[str, Scalar]


def expand(sweep: Sweep | None) -> list[Params]:
    """All trials of a sweep as parameter dicts; a task without a sweep has one empty trial."""
    if sweep is None:
        return [{}]
    if sweep.method == "grid":
        return _grid(sweep)
    assert sweep.samples is not None  # checked by Sweep
    if sweep.method == "random":
        unit = _random_unit(len(sweep.parameters), sweep.samples, sweep.seed)
    else:
        unit = _sobol_unit(len(sweep.parameters), sweep.samples, sweep.seed)
    names = list(sweep.parameters)
    return [
        {name: _map(sweep.parameters[name], row[j]) for j, name in enumerate(names)} for row in unit
    ]


def repeat_numbers(trials: list[Params]) -> list[int]:
    """For each trial, how many earlier trials have exactly the same parameters: 0 for the
    first of a parameter set, k for its k-th repeat.

    "The same" is what a run's identity hashes (the canonical JSON of the parameters), so
    ``1`` and ``1.0`` differ here exactly as they do in run ids. Numbering by parameter set
    rather than by position keeps a run's number when the list it came from is reordered.
    """
    seen: dict[bytes, int] = {}
    out: list[int] = []
    for params in trials:
        key = canonical_json(params)
        n = seen.get(key, 0)
        out.append(n)
        seen[key] = n + 1
    return out


def _values(dom: object) -> list[Scalar]:
    if isinstance(dom, list):
        return dom
    if isinstance(dom, Choice):
        return dom.values
    if isinstance(dom, IntRange):
        return list(range(dom.low, dom.high + 1))
    raise AssertionError(f"not a discrete domain: {dom!r}")  # pragma: no cover


def _grid(sweep: Sweep) -> list[Params]:
    names = list(sweep.parameters)
    axes = [_values(sweep.parameters[n]) for n in names]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes)]


def _random_unit(d: int, n: int, seed: int) -> list[list[float]]:
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed))
    out: list[list[float]] = rng.random((n, d)).tolist()
    return out


def _sobol_unit(d: int, n: int, seed: int) -> list[list[float]]:
    import warnings

    from scipy.stats import qmc

    sampler = qmc.Sobol(d=d, scramble=True, seed=seed)
    with warnings.catch_warnings():
        # n that is not a power of two loses Sobol's balance property; scipy warns, we accept
        warnings.simplefilter("ignore", UserWarning)
        out: list[list[float]] = sampler.random(n).tolist()
    return out


def _map(dom: Any, u: float) -> Scalar:
    u = min(max(u, 0.0), math.nextafter(1.0, 0.0))
    if isinstance(dom, Uniform):
        return dom.low + u * (dom.high - dom.low)
    if isinstance(dom, LogUniform):
        v = math.exp(math.log(dom.low) + u * (math.log(dom.high) - math.log(dom.low)))
        return min(max(v, dom.low), dom.high)  # exp(log(x)) may miss x by an ulp
    if isinstance(dom, IntRange):
        return dom.low + int(u * (dom.high - dom.low + 1))
    values = _values(dom)
    return values[int(u * len(values))]
