"""The shell's elastic path with in-memory ports: Provision and Terminate reach the provider
with the core's token, a lost answer is retried with the SAME token, a refusal (or a provider
that is not elastic) is told to the core, and the discovery after an answer settles it."""

from __future__ import annotations

from stowplan.errors import ProviderError
from stowplan.providers.base import ProviderState, Report
from stowplan.scheduler.events import TaskInstance, TasksSubmitted, elastic_token
from stowplan.scheduler.states import TaskState
from stowplan.shell import PROVIDER_BACKOFF, Wake

from .conftest import GIB, Harness

CLOUD = "p-cloud"


def gpu(run_id: str) -> TaskInstance:
    """Needs a GPU: only the elastic pool can run it."""
    return TaskInstance(run_id=run_id, cpus=2.0, memory=4 * GIB, gpus=1)


def calls(h: Harness, verb: str) -> list[tuple[str, float, tuple[str, ...]]]:
    return [c for c in h.prov.calls if c[0] == verb]


def test_a_lost_provision_answer_is_retried_with_the_same_token_and_starts_nothing_more() -> None:
    h = Harness(elastic=True)
    h.boot()
    h.prov.lose_provision = 1  # the instance starts, the answer never arrives
    h.shell.feed(TasksSubmitted(tasks=[gpu("a")]))
    token = elastic_token("provision", CLOUD, 1)
    assert calls(h, "provision") == [("provision", 0.0, (token,))]
    assert h.prov.instances == ["i-0"]
    # the run was sent to the room of the instance being launched; the core counts it
    assert h.core.state("a") is TaskState.QUEUED and h.core.pool("a") == CLOUD
    assert h.core.launched(CLOUD) == 1 and h.core.counts_order(token)
    (at,) = h.clock.due(Wake.RETRY)
    assert at == PROVIDER_BACKOFF.seconds(1, seed=7, key="provision:" + token)
    discovered = len(calls(h, "discover"))
    h.clock.advance(at)
    assert [c[2] for c in calls(h, "provision")] == [(token,), (token,)]
    assert h.prov.instances == ["i-0"]  # the retry found the first instance
    assert h.shell.counters.elastic_retries == 1 and h.shell.counters.provisions == 2
    # the answer made the shell rediscover; that discovery settled the token: the pool itself
    # now shows the instance, and the core no longer adds it
    assert len(calls(h, "discover")) == discovered + 1
    assert not h.core.counts_order(token) and h.core.launched(CLOUD) == 0
    assert h.core.free_capacity(CLOUD) == (2.0, 12 * GIB, {"a10g": 0})


def test_a_refusal_is_told_to_the_core_which_launches_again_after_a_rediscovery() -> None:
    h = Harness(elastic=True)
    h.boot()
    h.prov.errors["provision"] = [ProviderError("not allowed", provider="p", retryable=False)]
    h.shell.feed(TasksSubmitted(tasks=[gpu("a")]))
    first = elastic_token("provision", CLOUD, 1)
    assert not h.core.counts_order(first) and h.core.launched(CLOUD) == 0
    assert h.shell.counters.elastic_refusals == 1 and h.prov.instances == []
    assert h.clock.due(Wake.RETRY) == []  # not tried again
    h.shell.capacity_changed("p")  # the provider is looked at again
    h.clock.advance(1.0)
    again = elastic_token("provision", CLOUD, 2)
    assert [c[2] for c in calls(h, "provision")] == [(first,), (again,)]
    assert h.prov.instances == ["i-0"]


def test_a_provider_without_the_elastic_capability_is_never_asked() -> None:
    h = Harness(elastic="pools")  # reports an elastic-looking pool, cannot provision
    h.boot()
    h.shell.feed(TasksSubmitted(tasks=[gpu("a")]))
    assert calls(h, "provision") == []
    assert h.shell.counters.elastic_refusals == 1
    assert h.core.launched(CLOUD) == 0


def test_idle_instances_are_terminated_after_the_grace_and_the_next_discovery_settles_it() -> None:
    h = Harness(elastic=True, idle_grace=300.0)
    h.boot()
    h.shell.feed(TasksSubmitted(tasks=[gpu("a")]))
    h.clock.advance(1.0)
    assert h.prov.instances == ["i-0"] and h.core.launched(CLOUD) == 0  # settled
    key = h.core.key("a")
    h.prov.jobs[key] = ProviderState.SUCCEEDED
    h.clock.advance(100.0)
    h.shell.report("p", Report(key=key, state=ProviderState.SUCCEEDED))
    h.clock.advance(399.0)
    assert calls(h, "terminate") == []
    h.clock.advance(400.0)
    token = elastic_token("terminate", CLOUD, 2)  # one sequence per pool, both verbs
    assert calls(h, "terminate") == [("terminate", 400.0, (token,))]
    assert h.prov.instances == []
    assert not h.core.counts_order(token)
    assert h.core.free_capacity(CLOUD) == (0.0, 0, {"a10g": 0})
    h.clock.advance(2000.0)
    assert len(calls(h, "terminate")) == 1
