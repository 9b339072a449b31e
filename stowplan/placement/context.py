"""From what the user wrote to what every placement problem carries.

``context_for`` turns ``[placement]`` in stowplan.toml and the experiment's data inputs into a
``PlacementContext``: links, datasets (id = the input's URI, with its size and the sites holding
it) and residency rules. Names that do not resolve are the user's error, reported with the file,
the field and the rules that do exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from stowplan.errors import SpecError
from stowplan.placement.problem import Dataset, Link, PlacementContext, Weights
from stowplan.spec.loader import LoadedExperiment, LoadedProject, locate
from stowplan.spec.models import DataInput


def context_for(project: LoadedProject, loaded: LoadedExperiment) -> PlacementContext:
    settings = project.config.placement
    rules = {name: tuple(sites) for name, sites in sorted(settings.residency.items())}

    def unknown(rule: str, path: str) -> SpecError:
        known = ", ".join(sorted(rules)) or "none are defined"
        return SpecError(
            f"unknown residency rule {rule!r}",
            file=loaded.file,
            path=path,
            line=locate(Path(loaded.file), loaded.text, path),
            hint=f"define it under [placement.residency] in stowplan.toml ({known})",
        )

    datasets: dict[str, Dataset] = {}
    for ti, task in enumerate(loaded.spec.tasks):
        for r_i, rule in enumerate(task.placement.residency):
            if rule not in rules:
                raise unknown(rule, f"$.tasks[{ti}].placement.residency[{r_i}]")
        for ii, inp in enumerate(task.inputs):
            if inp.residency is not None and inp.residency not in rules:
                raise unknown(inp.residency, f"$.tasks[{ti}].inputs[{ii}].residency")
            d = dataset_of(inp)
            seen = datasets.get(inp.uri)
            if seen is not None and seen != d:
                raise SpecError(
                    f"input {inp.uri!r} is declared twice with different sizes, sites or rules",
                    file=loaded.file,
                    path=f"$.tasks[{ti}].inputs[{ii}]",
                    hint="declare it the same way in every task that reads it",
                )
            datasets[inp.uri] = d
    w = loaded.policy.placement
    return PlacementContext(
        links=[
            Link(
                src=lk.src,
                dst=lk.dst,
                bandwidth=float(lk.bandwidth),
                egress_per_gb=lk.egress_per_gb,
            )
            for lk in settings.links
        ],
        datasets=[datasets[k] for k in sorted(datasets)],
        residency=rules,
        weights=Weights(data=w.data, cost=w.cost, wait=w.wait, priority=w.priority),
        objective=settings.objective,
    )


def dataset_of(inp: DataInput) -> Dataset:
    """An input as placement sees it: id = its URI, its size (0 when not given), its sites."""
    size = inp.size if isinstance(inp.size, int) else 0
    return Dataset(
        id=inp.uri, size=size, sites=tuple(sorted(set(inp.sites))), residency=inp.residency
    )


def datasets_in_spec(spec: Mapping[str, Any]) -> list[Dataset]:
    """The inputs of a stored experiment (its canonical spec, ``ExperimentRecord.spec``), as
    ``context_for`` made them when it was submitted; the first declaration of a URI wins."""
    found: dict[str, Dataset] = {}
    for task in spec.get("tasks") or []:
        for raw in task.get("inputs") or []:
            d = dataset_of(msgspec.convert(raw, DataInput))
            found.setdefault(d.id, d)
    return [found[k] for k in sorted(found)]
