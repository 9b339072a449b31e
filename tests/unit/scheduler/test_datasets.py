"""A long-lived core places each submission with its own inputs (core module doc: *Datasets*)."""

from __future__ import annotations

from typing import Any

from stowplan.placement.problem import Dataset, Link, PlacementContext, Pool
from stowplan.scheduler.events import RestoredTask, Submit, TasksRestored, TasksSubmitted
from stowplan.scheduler.states import TaskState
from tests.unit.scheduler.test_core import Harness, items, of, task, transitions

GiB = 1 << 30
TB = 10**12
SLOW = 10e6  # bytes/s between the two sites


def two_sites(**config: Any) -> Harness:
    """``east`` is free, ``west`` costs money: without data the placer picks east."""
    east = Pool(id="east/cpu", provider="east", cpus=4, memory=16 * GiB, site="east")
    west = Pool(
        id="west/cpu", provider="west", cpus=4, memory=16 * GiB, site="west", price_per_hour=1.0
    )
    links = [
        Link(src="west", dst="east", bandwidth=SLOW),
        Link(src="east", dst="west", bandwidth=SLOW),
    ]
    context = PlacementContext(links=links, residency={"eu": ("west",)})
    return Harness(east, west, context=context, **config)


def pool_of(h: Harness, run_id: str) -> str | None:
    return h.core.pool(run_id)


def test_without_data_the_free_site_wins() -> None:
    h = two_sites()
    h.submit(task("r"))
    assert pool_of(h, "r") == "east/cpu"


def test_a_submission_brings_its_datasets_and_runs_go_to_them() -> None:
    h = two_sites()
    data = Dataset(id="s3://lab/corpus", size=TB, sites=("west",))
    out = h.send(TasksSubmitted(tasks=[task("r", datasets=("s3://lab/corpus",))], datasets=[data]))
    assert [i.run_id for i in items(out)] == ["r"]
    assert pool_of(h, "r") == "west/cpu"
    # a second submission that names it without declaring it again still finds it
    h.send(TasksSubmitted(tasks=[task("s", datasets=("s3://lab/corpus",))]))
    assert pool_of(h, "s") == "west/cpu"


def test_a_later_declaration_replaces_an_earlier_one() -> None:
    h = two_sites()
    h.send(
        TasksSubmitted(
            tasks=[task("r", datasets=("d",))], datasets=[Dataset(id="d", size=TB, sites=("west",))]
        )
    )
    h.send(
        TasksSubmitted(
            tasks=[task("s", datasets=("d",))], datasets=[Dataset(id="d", size=TB, sites=("east",))]
        )
    )
    assert (pool_of(h, "r"), pool_of(h, "s")) == ("west/cpu", "east/cpu")


def test_a_dataset_nobody_declared_is_placed_as_if_everywhere() -> None:
    h = two_sites()
    out = h.submit(task("r", datasets=("s3://never/declared",)))
    assert of(out, Submit), "the run must be placed, not wait on an invalid problem"
    assert pool_of(h, "r") == "east/cpu"


def test_a_residency_rule_the_core_lacks_allows_no_site() -> None:
    h = two_sites()
    data = Dataset(id="s3://lab/patients", size=1, sites=("west",), residency="hipaa")
    out = h.send(
        TasksSubmitted(tasks=[task("r", datasets=("s3://lab/patients",))], datasets=[data])
    )
    assert of(out, Submit) == []
    (failed,) = [t for t in transitions(out) if t.to_state is TaskState.FAILED]
    assert failed.run_id == "r" and "residency rule hipaa" in failed.reason
    # a task's own rule the core lacks: likewise nowhere
    out = h.submit(task("s", residency=("gdpr-strict",)))
    assert of(out, Submit) == []
    assert h.core.state("s") is TaskState.FAILED
    # a rule the core has still places
    h.submit(task("t", residency=("eu",)))
    assert pool_of(h, "t") == "west/cpu"


def test_restored_runs_bring_their_datasets() -> None:
    h = two_sites()
    data = Dataset(id="s3://lab/corpus", size=TB, sites=("west",))
    rt = RestoredTask(
        task=task("r", datasets=("s3://lab/corpus",)), state=TaskState.PENDING, attempt=1
    )
    h.send(TasksRestored(tasks=[rt], datasets=[data]))
    assert pool_of(h, "r") == "west/cpu"
