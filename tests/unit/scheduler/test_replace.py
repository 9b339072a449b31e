"""A pool that could not start an attempt (``FailureClass.NO_CAPACITY``): the core re-places the
run at once elsewhere, leaves that pool out for the shape for a cool-down on its own clock, does
not count the attempt against the retry policy, and gives up after ``max_replaces`` in a row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stowplan.placement.problem import Assignment, PlacementSolution, PlacementStatus
from stowplan.scheduler.events import (
    Cancel,
    Command,
    PlacementDecided,
    ProviderReported,
    SolvePlacement,
    SubmitItem,
    WakeAt,
)
from stowplan.scheduler.reports import ProviderState as P
from stowplan.scheduler.reports import Report
from stowplan.scheduler.states import TaskState as S
from stowplan.spec.canonical import attempt_key
from stowplan.spec.models import FailureClass as F
from stowplan.spec.models import RetryPolicy
from tests.unit.scheduler.test_core import Harness, items, of, pool, task, transitions

REPO = Path(__file__).resolve().parents[3]
NOW = 1_000_000.0  # far from the wall clock: the core must only use the time it is given


def cluster(**config: Any) -> Harness:
    """Two pools of one provider; "k8s/a" is free, "k8s/b" costs: placement prefers a."""
    h = Harness(
        pool("k8s/a", provider="k8s", cpus=4),
        pool("k8s/b", provider="k8s", cpus=4, price=1.0),
        **config,
    )
    h.now = NOW
    return h


WHY = "unschedulable for 600s: 0/3 nodes are available: 3 Insufficient cpu."


def refuse(h: Harness, run_id: str, at: float) -> list[Command]:
    rep = Report(key=h.core.key(run_id), state=P.FAILED, failure=F.NO_CAPACITY, message=WHY)
    return h.send(ProviderReported(provider="k8s", reports=[rep]), at=at)


def test_a_refused_attempt_is_placed_again_at_once_in_another_pool() -> None:
    h = cluster()
    h.submit(task("t"))
    assert h.core.pool("t") == "k8s/a"
    first = h.core.key("t")
    out = refuse(h, "t", NOW)
    # in the same step: the old attempt is cancelled at the provider and a new one goes to b
    assert of(out, Cancel) == [Cancel(provider="k8s", keys=[first])]
    assert items(out) == [SubmitItem("t", 2, attempt_key("t", 2))]
    assert h.core.pool("t") == "k8s/b" and h.states("t") == [S.SUBMITTING]
    # the record says why, with the pool that refused it
    moves = transitions(out)
    assert [(m.from_state, m.to_state) for m in moves][:2] == [
        (S.SUBMITTING, S.RETRYING),
        (S.RETRYING, S.READY),
    ]
    assert moves[0].failure is F.NO_CAPACITY and moves[0].pool == "k8s/a"
    assert moves[0].reason.startswith(f"no capacity in k8s/a: {WHY} (it never ran")
    assert h.core.uncounted_attempts("t") == 1
    h.check_counts()


def test_the_pool_is_left_out_for_the_cooldown_on_the_cores_clock() -> None:
    h = cluster(no_capacity_cooldown=300.0)
    h.submit(task("t"))
    out = refuse(h, "t", NOW)
    assert WakeAt(at=NOW + 300.0) in out
    assert h.core.cooling(task("x")) == ["k8s/a"]
    # another run of the same shape, during the cool-down: not offered a
    out = h.submit(task("u"))
    (sp,) = of(out, SolvePlacement)
    assert sp.problem.classes[0].forbid_pools == ("k8s/a",)
    assert h.core.pool("u") == "k8s/b"
    # after it: a is offered again (the core's clock, not the wall clock, decides)
    h.tick(NOW + 299.0)
    assert h.core.cooling(task("x")) == ["k8s/a"]
    h.tick(NOW + 300.0)
    assert h.core.cooling(task("x")) == []
    h.submit(task("v"))
    assert h.core.pool("v") == "k8s/a"


def test_a_run_whose_only_pool_cools_down_waits_and_is_offered_it_again() -> None:
    h = Harness(pool("k8s/a", provider="k8s", cpus=4), no_capacity_cooldown=60.0)
    h.now = NOW
    h.submit(task("t"))
    out = refuse(h, "t", NOW)
    assert items(out) == [] and of(out, SolvePlacement) == []
    assert h.states("t") == [S.READY]  # waiting, not failed
    assert WakeAt(at=NOW + 60.0) in out
    assert items(h.tick(NOW + 59.0)) == []
    assert items(h.tick(NOW + 60.0)) == [SubmitItem("t", 2, attempt_key("t", 2))]
    assert h.core.pool("t") == "k8s/a"


def test_the_cooldown_is_per_task_shape() -> None:
    h = cluster()
    h.submit(task("big", cpus=4))
    assert h.core.pool("big") == "k8s/a"
    refuse(h, "big", NOW)
    assert h.core.pool("big") == "k8s/b"
    # a smaller shape may still start in a (a fragmented Kubernetes pool, say)
    h.submit(task("small", cpus=1))
    assert h.core.pool("small") == "k8s/a"
    assert h.core.cooling(task("x", cpus=4)) == ["k8s/a"] and h.core.cooling(task("x")) == []


def test_refusals_do_not_count_against_max_attempts() -> None:
    retry = RetryPolicy(max_attempts=2, backoff=1, jitter=0)
    h = cluster(no_capacity_cooldown=0.0)
    h.submit(task("t", retry=retry))
    for i in range(3):  # three refusals: attempts 1-3 never ran
        refuse(h, "t", NOW + i)
        assert h.states("t") == [S.SUBMITTING]
    assert h.core.attempt("t") == 4 and h.core.uncounted_attempts("t") == 3
    h.report("t", P.FAILED, F.PREEMPTED, at=NOW + 10, provider="k8s")  # the first that ran
    assert h.states("t") == [S.RETRYING]
    h.tick(NOW + 20)
    h.report("t", P.FAILED, F.PREEMPTED, at=NOW + 30, provider="k8s")  # the second
    assert h.states("t") == [S.FAILED]
    assert h.core.attempt("t") - h.core.uncounted_attempts("t") == retry.max_attempts


def test_refusals_in_a_row_are_bounded() -> None:
    h = cluster(no_capacity_cooldown=600.0, max_replaces=2)
    h.submit(task("t"))
    refuse(h, "t", NOW)
    assert h.core.pool("t") == "k8s/b"
    out = refuse(h, "t", NOW + 1)
    assert h.states("t") == [S.READY] and items(out) == []  # both pools cool down
    h.tick(NOW + 600)
    assert h.core.pool("t") == "k8s/a" and h.states("t") == [S.SUBMITTING]
    last = h.core.key("t")
    out = refuse(h, "t", NOW + 700)
    assert h.states("t") == [S.FAILED]
    assert of(out, Cancel) == [Cancel(provider="k8s", keys=[last])]
    assert items(out) == []
    (move,) = transitions(out)
    assert move.failure is F.NO_CAPACITY
    assert move.reason == (
        "no capacity: 3 placements in a row could not start it (in k8s/a, k8s/b; the last "
        f"said: {WHY}); not placed again (max_replaces = 2)"
    )
    h.check_counts()


def test_a_run_that_ran_starts_a_new_row() -> None:
    h = cluster(no_capacity_cooldown=0.0, max_replaces=1)
    h.submit(task("t", retry=RetryPolicy(backoff=1, jitter=0)))
    refuse(h, "t", NOW)
    h.report("t", P.RUNNING, at=NOW + 1, provider="k8s")
    h.report("t", P.FAILED, F.PREEMPTED, at=NOW + 2, provider="k8s")
    h.tick(NOW + 10)
    refuse(h, "t", NOW + 11)  # one in a row again, not two
    assert h.states("t") == [S.SUBMITTING]
    refuse(h, "t", NOW + 12)
    assert h.states("t") == [S.FAILED]


def test_a_late_report_for_the_refused_attempt_is_ignored() -> None:
    h = cluster()
    h.submit(task("t"))
    first = h.core.key("t")
    refuse(h, "t", NOW)
    before = h.core.ignored_reports
    h.report("t", P.RUNNING, key=first, at=NOW + 1, provider="k8s")
    assert h.core.ignored_reports == before + 1
    assert h.core.pool("t") == "k8s/b" and h.states("t") == [S.SUBMITTING]


def test_the_retry_policy_does_not_take_no_capacity() -> None:
    with pytest.raises(ValueError, match="no_capacity is not for the retry policy"):
        RetryPolicy(on=[F.NO_CAPACITY])


def scenario(order: str, *, reverse: bool = False) -> list[Command]:
    """One run refused by the pools named in ``order``, in that order (pools discovered in
    reverse when asked): every command the core gave."""
    pools = [pool(f"k8s/{p}", provider="k8s", cpus=4) for p in "abcd"]
    h = Harness(*(pools[::-1] if reverse else pools), auto_place=False)
    out = h.submit(task("t"))
    for i, name in enumerate(order):
        (sp,) = of(out, SolvePlacement)
        answer = PlacementSolution(
            request_id=sp.problem.request_id,
            status=PlacementStatus.GREEDY,
            assignments=[Assignment(sp.problem.classes[0].id, f"k8s/{name}", 1)],
        )
        h.send(PlacementDecided(solution=answer))
        out = h.report("t", P.FAILED, F.NO_CAPACITY, at=NOW + i, provider="k8s")
    return h.log


def test_decisions_do_not_depend_on_the_order_things_were_learned() -> None:
    a = of(scenario("abc"), SolvePlacement)[-1].problem
    b = of(scenario("cba", reverse=True), SolvePlacement)[-1].problem
    assert a.classes[0].forbid_pools == b.classes[0].forbid_pools == ("k8s/a", "k8s/b", "k8s/c")
    assert [p.id for p in a.pools] == [p.id for p in b.pools]


SCRIPT = """
import msgspec, sys
sys.path.insert(0, sys.argv[1])
from tests.unit.scheduler.test_replace import scenario
print(msgspec.json.encode(scenario("bda")).decode())
"""


def test_the_same_events_give_the_same_commands_under_any_hash_seed() -> None:
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        got = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(REPO)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        outs.append(json.loads(got.stdout))
    assert outs[0] == outs[1]
    assert any("Cancel" in json.dumps(c) for c in outs[0])
