from __future__ import annotations

import pytest

from stowplan.simulator.engine import Engine, stream_seed


def test_events_run_in_time_then_priority_then_order() -> None:
    e = Engine()
    seen: list[str] = []
    e.at(2.0, seen.append, "late")
    e.at(1.0, seen.append, "b-prio5", priority=5)
    e.at(1.0, seen.append, "a-prio0-first", priority=0)
    e.at(1.0, seen.append, "a-prio0-second", priority=0)
    assert e.peek() == 1.0
    e.run()
    assert seen == ["a-prio0-first", "a-prio0-second", "b-prio5", "late"]
    assert e.now == 2.0
    assert e.events_run == 4


def test_run_until_stops_before_later_events_and_sets_the_clock() -> None:
    e = Engine()
    seen: list[float] = []
    for t in (1.0, 5.0, 10.0):
        e.at(t, seen.append, t)
    e.run(until=5.0)
    assert seen == [1.0, 5.0]
    assert e.now == 5.0
    assert e.peek() == 10.0
    e.run(until=7.0)
    assert e.now == 7.0 and seen == [1.0, 5.0]
    e.step()
    assert seen == [1.0, 5.0, 10.0]
    with pytest.raises(IndexError):
        e.step()


def test_an_event_cannot_be_scheduled_in_the_past() -> None:
    e = Engine()
    e.at(3.0, lambda _: None)
    e.run()
    with pytest.raises(Exception, match="before now"):
        e.at(1.0, lambda _: None)


def test_a_failing_event_stops_the_run_and_says_when() -> None:
    e = Engine()

    def boom(_: object) -> None:
        raise ValueError("broken")

    e.at(4.5, boom)
    e.at(9.0, lambda _: None)
    with pytest.raises(ValueError, match="broken") as info:
        e.run()
    assert any("4.500" in n for n in info.value.__notes__)
    assert e.peek() == 9.0  # the later event was not lost


def test_stop_drops_the_rest_and_keeps_the_clock() -> None:
    e = Engine()
    seen: list[int] = []
    e.at(1.0, lambda _: e.stop())
    e.at(2.0, seen.append, 2)
    e.run(until=100.0)
    assert seen == [] and e.now == 1.0


def test_streams_are_seeded_per_component_and_independent() -> None:
    a, b = Engine(seed=3), Engine(seed=3)
    xs = [a.rng("faults").random() for _ in range(3)]
    b.rng("other").random()  # drawing from another stream does not shift this one
    assert [b.rng("faults").random() for _ in range(3)] == xs
    assert Engine(seed=4).rng("faults").random() != xs[0]
    assert stream_seed(1, "x") != stream_seed(1, "y")
