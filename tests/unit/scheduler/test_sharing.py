"""Sharing a lab's GPUs between teams (core module doc: *Sharing*; ``scheduler.share``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stowplan.placement.problem import Pool
from stowplan.scheduler.events import TaskInstance
from stowplan.scheduler.reports import ProviderState
from stowplan.scheduler.share import Ledger, TeamLimits
from stowplan.scheduler.states import LEASED, TaskState
from tests.unit.scheduler.test_core import Harness, items, task

S = TaskState

GiB = 1 << 30


def lab(a100: int = 8, h100: int = 0, **config: Any) -> Harness:
    pools = [Pool(id="lab/a100", provider="lab", cpus=256, memory=2048 * GiB, gpus={"A100": a100})]
    if h100:
        pools.append(
            Pool(id="lab/h100", provider="lab", cpus=256, memory=2048 * GiB, gpus={"H100": h100})
        )
    return Harness(*pools, **config)


def gpu(run_id: str, team: str, user: str = "u", gpus: int = 1, **kw: Any) -> TaskInstance:
    return task(run_id, team=team, user=user, gpus=gpus, cpus=1, memory=GiB, **kw)


def leased(h: Harness, prefix: str = "") -> list[str]:
    return sorted(r for r in h.core.run_ids() if r.startswith(prefix) and h.core.state(r) in LEASED)


def finish(h: Harness, *run_ids: str, at: float | None = None) -> None:
    for r in run_ids:
        h.report(r, ProviderState.RUNNING)
        h.report(r, ProviderState.SUCCEEDED, at=at)


def test_a_team_never_holds_more_than_its_maximum() -> None:
    h = lab(teams={"vision": TeamLimits(max_gpus={"A100": 3})})
    h.submit(*(gpu(f"v{i}", "vision") for i in range(6)))
    assert len(leased(h, "v")) == 3
    waiting = [r for r in h.core.run_ids() if h.core.state(r) is TaskState.READY]
    assert len(waiting) == 3
    assert all("holds 3 A100 GPUs, its maximum" in h.core.held(r) for r in waiting)
    # one ends: exactly one more starts
    finish(h, leased(h, "v")[0])
    assert len(leased(h, "v")) == 3


def test_the_maximum_across_models_counts_every_model() -> None:
    h = lab(a100=4, h100=4, teams={"vision": TeamLimits(max_gpus={"*": 5})})
    h.submit(*(gpu(f"v{i}", "vision") for i in range(8)))
    assert len(leased(h, "v")) == 5


def test_other_teams_are_not_limited_by_one_teams_maximum() -> None:
    h = lab(teams={"vision": TeamLimits(max_gpus={"A100": 2})})
    h.submit(*(gpu(f"v{i}", "vision") for i in range(4)), *(gpu(f"n{i}", "nlp") for i in range(4)))
    assert len(leased(h, "v")) == 2
    assert len(leased(h, "n")) == 4


def test_an_idle_guarantee_is_borrowed_and_comes_back_first() -> None:
    teams = {
        "vision": TeamLimits(guaranteed_gpus={"A100": 4}),
        "nlp": TeamLimits(guaranteed_gpus={"A100": 4}),
    }
    h = lab(a100=8, teams=teams)
    # nlp alone: it borrows vision's idle guarantee
    h.submit(*(gpu(f"n{i}", "nlp") for i in range(10)))
    assert len(leased(h, "n")) == 8
    # vision arrives: as nlp's borrowed runs end, vision gets them, not nlp's waiting runs
    h.submit(*(gpu(f"v{i}", "vision") for i in range(6)))
    assert leased(h, "v") == []
    finish(h, *leased(h, "n")[:3])
    assert len(leased(h, "v")) == 3
    assert len(leased(h, "n")) == 5
    nlp_waiting = [r for r in h.core.run_ids() if r[0] == "n" and h.core.state(r) is S.READY]
    why = "are guaranteed to teams with runs waiting: vision"
    assert nlp_waiting and all(why in h.core.held(r) for r in nlp_waiting)
    finish(h, *leased(h, "n")[:2])
    # vision reached its guarantee (4); the 5th free GPU is shared by fair share again
    assert len(leased(h, "v")) >= 4
    assert len(leased(h, "v")) + len(leased(h, "n")) == 8


def test_borrowing_one_model_never_erodes_a_guarantee_on_another() -> None:
    teams = {
        "vision": TeamLimits(guaranteed_gpus={"H100": 2}),
        "nlp": TeamLimits(guaranteed_gpus={"A100": 2}),
    }
    h = lab(a100=2, h100=2, teams=teams)
    # vision fills the A100s (borrowing nlp's idle guarantee) and its own H100s; one waits
    h.submit(*(gpu(f"v{i}", "vision") for i in range(5)))
    assert len(leased(h, "v")) == 4
    # nlp asks for H100s only
    h.submit(gpu("n0", "nlp", gpu_types=("H100",)))
    assert h.core.state("n0") is TaskState.READY
    # an H100 frees: vision is over its total guarantee (it borrows A100s), but its H100
    # guarantee is its own: its waiting run gets the H100, nlp's does not
    on_h100 = [r for r in leased(h, "v") if h.core.pool(r) == "lab/h100"]
    finish(h, on_h100[0])
    assert h.core.state("v4") in LEASED and h.core.pool("v4") == "lab/h100"
    assert h.core.state("n0") is TaskState.READY
    assert h.core.held("n0") == "no H100 GPU free"


def test_gpu_hours_in_the_rolling_window() -> None:
    teams = {"vision": TeamLimits(gpu_hours=2.0, window_s=86400.0)}
    h = lab(teams=teams)
    h.submit(gpu("v0", "vision", gpus=2))
    h.report("v0", ProviderState.RUNNING, at=0.0)
    h.report("v0", ProviderState.SUCCEEDED, at=3600.0)  # 2 GPU-hours used
    h.submit(gpu("v1", "vision"))
    assert h.core.state("v1") is TaskState.READY
    assert "used 2.0 of its 2 GPU-hours in the last 1d" in h.core.held("v1")
    # a day later the use has left the window; something must wake the core
    h.tick(at=3600.0 + 86400.0 + 1)
    h.submit(gpu("v2", "vision"))
    assert h.core.state("v1") in LEASED


def test_priority_is_respected_across_teams_fair_share_within_it() -> None:
    h = lab(a100=2, teams={"a": TeamLimits(), "b": TeamLimits()})
    h.submit(gpu("a0", "a"), gpu("a1", "a"))
    finish(h, "a0", "a1", at=1000.0)  # team a has used GPUs, b has not
    h.submit(gpu("a2", "a"), gpu("b0", "b"), gpu("a3", "a", priority=5))
    # priority first (a3), then the team with less usage (b0), a2 waits
    assert leased(h) == ["a3", "b0"]


def test_within_a_team_the_user_with_less_usage_goes_first() -> None:
    h = lab(a100=1, teams={"a": TeamLimits()})
    h.submit(gpu("x0", "a", user="ann"))
    finish(h, "x0", at=500.0)
    h.submit(gpu("x1", "a", user="ann"), gpu("y1", "a", user="bob"))
    assert leased(h) == ["y1"]


def test_a_held_run_starts_once_room_frees_and_its_reason_goes() -> None:
    h = lab(teams={"vision": TeamLimits(max_gpus={"A100": 1})})
    h.submit(gpu("v0", "vision"), gpu("v1", "vision"))
    assert h.core.held("v1")
    out = []
    h.report("v0", ProviderState.RUNNING)
    out = h.report("v0", ProviderState.SUCCEEDED)
    assert [i.run_id for i in items(out)] == ["v1"]
    assert h.core.held("v1") == ""


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(1, 3), st.sampled_from(["A100", "H100", ""])),
        min_size=1,
        max_size=25,
    ),
    st.dictionaries(st.sampled_from("abc"), st.integers(0, 6)),
    st.dictionaries(st.sampled_from("abc"), st.integers(0, 4)),
)
def test_no_team_ever_holds_more_than_its_maximum(
    runs: list[tuple[str, int, str]], maxima: dict[str, int], guarantees: dict[str, int]
) -> None:
    teams = {
        t: TeamLimits(
            max_gpus={"A100": maxima[t]} if t in maxima else {},
            guaranteed_gpus={"H100": guarantees[t]} if t in guarantees else {},
        )
        for t in "abc"
    }
    h = lab(a100=6, h100=4, teams=teams)
    tasks = [
        gpu(f"{team}{i:02d}", team, gpus=n, gpu_types=(m,) if m else ())
        for i, (team, n, m) in enumerate(runs)
    ]
    h.submit(*tasks)
    for step in range(len(tasks) + 1):
        held: dict[str, Counter[str]] = {}
        for r in leased(h):
            t = next(x for x in tasks if x.run_id == r)
            model = "A100" if h.core.pool(r) == "lab/a100" else "H100"
            held.setdefault(t.team, Counter())[model] += t.gpus
        for team, limit in maxima.items():
            assert held.get(team, Counter())["A100"] <= limit
        running = leased(h)
        if not running:
            break
        finish(h, running[step % len(running)])


def test_ledger_without_limits_says_nothing() -> None:
    ledger = Ledger({})
    assert ledger.room("x", ["A100"], {"A100": 1}, {}, 0.0).gpus == {}


@pytest.mark.parametrize(("window", "text"), [(86400.0, "1d"), (7200.0, "2h"), (90.0, "90s")])
def test_windows_are_named_for_people(window: float, text: str) -> None:
    ledger = Ledger({"t": TeamLimits(gpu_hours=0.0, window_s=window)})
    room = ledger.room("t", ["A100"], {"A100": 4}, {}, 0.0)
    assert room.gpus == {"A100": 0.0}
    assert room.why["A100"].endswith(f"in the last {text}")


def test_the_core_reports_each_teams_use_against_its_limits() -> None:
    teams = {"vision": TeamLimits(max_gpus={"A100": 2}, gpu_hours=10.0, window_s=3600.0)}
    h = lab(teams=teams)
    h.submit(*(gpu(f"v{i}", "vision") for i in range(3)), gpu("n0", "nlp"))
    h.report("v0", ProviderState.RUNNING, at=0.0)
    h.tick(at=1800.0)
    report = h.core.sharing()
    assert list(report) == ["vision"]
    assert report["vision"]["holds"] == {"A100": 2}
    assert report["vision"]["waiting_gpus"] == 1
    assert report["vision"]["gpu_hours"] == pytest.approx(1.0)  # 2 GPUs held for half an hour
    assert report["vision"]["limits"]["max_gpus"] == {"A100": 2}
