"""What keeps the queue actor light with 10^5 runs: structs the cycle collector never walks,
a submission that does not keep its buffer, and the collector's settings in an actor."""

from __future__ import annotations

import gc
import subprocess
import sys
import typing
from collections.abc import Iterator

import msgspec
import msgspec.inspect as mi

from stowplan.actors import wire
from stowplan.actors.queue import SubmittedRun, compact
from stowplan.actors.wire import pack, unpack
from stowplan.placement import solve
from stowplan.placement.leases import DeviceLease
from stowplan.placement.problem import Pool
from stowplan.provenance.store.runs import AttemptRow, IntentRow, Step
from stowplan.scheduler.core import CoreConfig, SchedulerCore
from stowplan.scheduler.events import (
    PlacementDecided,
    PoolsDiscovered,
    ProviderReported,
    RestoredTask,
    SolvePlacement,
    Submit,
    SubmitItem,
    TaskInstance,
    TasksSubmitted,
    Transition,
    Transitioned,
)
from stowplan.scheduler.plan import Launch, RunPayload
from stowplan.scheduler.reports import ProviderState, Report
from stowplan.scheduler.states import TaskState
from stowplan.session import launch_spec
from stowplan.spec.models import FailureClass, RetryPolicy

UNTRACKED: list[type[msgspec.Struct]] = [
    TaskInstance,
    RestoredTask,
    SubmitItem,
    Transition,
    SubmittedRun,
    Step,
    AttemptRow,
    IntentRow,
]
"""made per run or per step and kept by the thousand: declared ``gc=False``."""


def instance(i: int) -> TaskInstance:
    # tuples and enums that the collector tracks, so only gc=False leaves the struct untracked
    return TaskInstance(
        run_id=f"{i:064x}",
        group="sweep",
        depends_on=(f"{i + 1:064x}",),
        datasets=("d",),
        retry=RetryPolicy(on=[FailureClass.NODE_FAILURE]),
    )


def test_the_structs_the_core_makes_per_run_and_step_are_not_tracked() -> None:
    core = SchedulerCore(CoreConfig())
    pool = Pool(id="local/cpu", provider="local", cpus=4, memory=64 << 30)
    core.handle(PoolsDiscovered(provider="local", pools=[pool]), 0.0)
    tasks = [TaskInstance(run_id=f"{i:064x}", group="sweep") for i in range(3)]
    # decoded, as the queue hands them over: their tuples are fresh, tracked objects
    cmds = core.handle(unpack(pack(TasksSubmitted(tasks=tasks)), TasksSubmitted), 1.0)
    for sp in (c for c in cmds if isinstance(c, SolvePlacement)):
        cmds += core.handle(PlacementDecided(solution=solve(sp.problem)), 2.0)
    items = [i for c in cmds if isinstance(c, Submit) for i in c.items]
    assert len(items) == 3
    reports = [Report(key=i.key, state=ProviderState.SUCCEEDED) for i in items]
    cmds += core.handle(ProviderReported(provider="local", reports=reports), 3.0)
    steps = [t for c in cmds if isinstance(c, Transitioned) for t in c.records]
    assert {t.to_state for t in steps} >= {TaskState.READY, TaskState.SUCCEEDED}
    assert [s for s in [*items, *steps] if gc.is_tracked(s)] == []


def test_decoded_runs_and_restored_tasks_are_not_tracked() -> None:
    t = unpack(pack(instance(1)), TaskInstance)
    assert gc.is_tracked(t.depends_on)  # what makes the struct tracked, were it gc=True
    assert not gc.is_tracked(t)
    restored = RestoredTask(task=t, state=TaskState.RUNNING, attempt=1, provider="local")
    assert not gc.is_tracked(restored)
    lease = DeviceLease(node="n1", devices=(0, 1))
    assert not gc.is_tracked(SubmitItem(t.run_id, 1, "k", lease))
    run = unpack(pack(payload(1)), SubmittedRun)
    assert not gc.is_tracked(run)
    assert not gc.is_tracked(Transition("r", 1, TaskState.READY, TaskState.FAILED, None, "", None))


def test_the_rows_the_queue_buffers_for_the_store_are_not_tracked() -> None:
    # made with the states' enums, which the collector tracks: only gc=False leaves them out
    ready, placed = TaskState.READY, TaskState.PLACED
    assert gc.is_tracked(ready)
    assert not gc.is_tracked(Step("r", 1, ready, placed, 1.0, None, "", "local/cpu"))
    assert not gc.is_tracked(AttemptRow("k", "r", 1, "local", "local/cpu", ProviderState.RUNNING))
    assert not gc.is_tracked(IntentRow("k", "r", 1, 0, 0, "n1", "0,1"))


def _types(t: mi.Type) -> Iterator[mi.Type]:
    """``t`` and every type inside it (a struct's fields, a list's items, a union's members)."""
    yield t
    if isinstance(t, mi.StructType):
        return  # its own fields are walked from it (``_reaches``)
    for f in msgspec.structs.fields(t):
        v = getattr(t, f.name)
        for x in v if isinstance(v, tuple) else (v,):
            if isinstance(x, mi.Type):
                yield from _types(x)


def _reaches(cls: type[msgspec.Struct]) -> tuple[set[type], bool]:
    """The struct types reachable through ``cls``'s fields, and whether any field is a type
    that could hold anything (``Any``, an unknown class)."""
    seen: set[type] = set()
    anything = False
    todo = [cls]
    while todo:
        info = mi.type_info(todo.pop())
        assert isinstance(info, mi.StructType)
        for f in info.fields:
            for t in _types(f.type):
                if isinstance(t, mi.AnyType | mi.CustomType):
                    anything = True
                elif isinstance(t, mi.StructType) and t.cls not in seen:
                    seen.add(t.cls)
                    todo.append(t.cls)
    return seen, anything


def test_an_untracked_struct_cannot_take_part_in_a_reference_cycle() -> None:
    # msgspec: a gc=False struct must never be part of a cycle (it would never be freed). A
    # cycle through one needs a field that can hold, however deep, that struct again: a field
    # of its own type (or of one that holds it) or of any type at all.
    for cls in UNTRACKED:
        reached, anything = _reaches(cls)
        assert not anything, cls.__name__
        assert cls not in reached, cls.__name__
        assert not cls.__flags__ & HAVE_GC, cls.__name__  # declared gc=False


HAVE_GC = 1 << 14
"""``Py_TPFLAGS_HAVE_GC``: the type's instances may be tracked by the cycle collector."""


class Node(msgspec.Struct, gc=False):
    value: int
    parent: Node | None = None


class Loose(msgspec.Struct, gc=False):
    extra: typing.Any


def test_the_check_finds_a_field_that_could_close_a_cycle() -> None:
    assert Node.__flags__ & HAVE_GC == 0
    assert Node in _reaches(Node)[0]
    assert _reaches(Loose)[1]


def payload(i: int) -> RunPayload:
    return RunPayload(
        instance=instance(i),
        launch=Launch(argv=["true", str(i)], script=None, env={}, outputs=[], timeout_s=None),
        name=f"exp-noop-{i}",
    )


def test_a_compacted_submission_shares_what_its_runs_share_and_frees_its_buffer() -> None:
    runs = [payload(i) for i in range(4)]
    blob = pack(runs)
    alone = sys.getrefcount(blob)
    got = unpack(blob, list[SubmittedRun])
    assert sys.getrefcount(blob) > alone  # each launch is a view into it
    got = compact(got)
    assert sys.getrefcount(blob) == alone
    assert [g.payload() for g in got] == runs
    first = got[0].instance
    for g in got[1:]:
        assert g.instance.retry is first.retry
        assert g.instance.project is first.project
        assert g.instance.group is first.group


def test_the_collector_is_left_alone_outside_an_actor() -> None:
    before = gc.get_threshold(), gc.get_freeze_count()
    wire.tune_gc()
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_in_an_actor_the_collector_freezes_what_booted_and_collects_less_often() -> None:
    # in a fresh process, so this one's collector is left as it was
    code = (
        "import gc\n"
        "from stowplan.actors import wire\n"
        "wire.in_actor = lambda: True\n"
        "wire.tune_gc()\n"
        "frozen = gc.get_freeze_count()\n"
        "wire.tune_gc()\n"
        "print(gc.get_threshold()[0], frozen > 1000, gc.get_freeze_count() == frozen)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == [str(wire.GEN0_THRESHOLD), "True", "True"]


def _placed(core: SchedulerCore, tasks: list[TaskInstance]) -> list[SubmitItem]:
    """Submit ``tasks`` to ``core`` (with one pool), place them; the submitted items."""
    pool = Pool(id="local/cpu", provider="local", cpus=64, memory=64 << 30)
    core.handle(PoolsDiscovered(provider="local", pools=[pool]), 0.0)
    cmds = core.handle(TasksSubmitted(tasks=tasks), 1.0)
    for sp in (c for c in cmds if isinstance(c, SolvePlacement)):
        cmds += core.handle(PlacementDecided(solution=solve(sp.problem)), 2.0)
    return [i for c in cmds if isinstance(c, Submit) for i in c.items]


def test_runs_of_one_shape_share_their_bucket_key() -> None:
    core = SchedulerCore(CoreConfig())
    tasks = [TaskInstance(run_id=f"{i:064x}", group="sweep") for i in range(3)]
    wide = TaskInstance(run_id=f"{9:064x}", group="sweep", cpus=2)
    _placed(core, [*tasks, wide])
    buckets = [core._runs[t.run_id].bucket for t in tasks]
    assert buckets[0] is not None
    assert all(b is buckets[0] for b in buckets)  # one tuple, not one per run
    assert core._runs[wide.run_id].bucket != buckets[0]


def test_a_run_nothing_waits_on_keeps_no_list_of_dependents() -> None:
    core = SchedulerCore(CoreConfig())
    first = TaskInstance(run_id="a" * 64, group="sweep")
    second = TaskInstance(run_id="b" * 64, group="sweep", depends_on=(first.run_id,))
    (item,) = _placed(core, [first, second])
    assert core._runs[second.run_id].dependents == ()
    assert core._runs[first.run_id].dependents == [second.run_id]
    report = Report(key=item.key, state=ProviderState.SUCCEEDED)
    core.handle(ProviderReported(provider="local", reports=[report]), 3.0)
    assert core.state(second.run_id) is not TaskState.PENDING  # its dependency let it go


def test_a_key_gives_its_run_attempt_and_pool_in_one_lookup() -> None:
    core = SchedulerCore(CoreConfig())
    items = _placed(core, [TaskInstance(run_id=f"{i:064x}", group="sweep") for i in range(2)])
    assert len(items) == 2
    for item in items:
        got = core.attempt_of_key(item.key)
        assert got == (item.run_id, item.attempt, "local/cpu")
        assert got == (core.run_of_key(item.key), core.attempt(item.run_id), core.pool(item.run_id))
    assert core.attempt_of_key("no-such-key") is None


def test_a_launch_copies_only_what_it_changes() -> None:
    p = payload(1)
    p.launch.env["A"] = "1"
    alone = launch_spec(p, p.instance.run_id, 1, "k1", "local/cpu")
    assert alone.env is p.launch.env and alone.secrets == {}
    with_upstream = launch_spec(p, p.instance.run_id, 1, "k1", "local/cpu", b"[]")
    assert with_upstream.env == {"A": "1", "STOWPLAN_UPSTREAM": "upstream.json"}
    assert with_upstream.files == {"upstream.json": b"[]"}
    assert p.launch.env == {"A": "1"}  # the payload's own is left as it was
