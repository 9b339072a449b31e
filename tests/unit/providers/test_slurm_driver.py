"""The Slurm driver on contract v2, over an in-memory backend: one try per submit (the shell
retries), find before submitting again, batched describes without a cache of its own, and
capacity news from what Slurm reports (rows captured from the real test cluster)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import anyio
import msgspec
import pytest

from stowplan.errors import ProviderError
from stowplan.placement.problem import Pool
from stowplan.providers.base import Facts, LaunchSpec, Provider, ProviderState, WatchSet
from stowplan.providers.slurm import SlurmProvider, SlurmRequest
from stowplan.providers.slurm.backend import Backend, KeyInfo
from stowplan.providers.slurm.parse import JobRow, PartitionFacts, parse_sacct, parse_squeue
from stowplan.providers.slurm.ssh import TransportLost
from stowplan.providers.slurm.states import capacity_reason
from stowplan.spec.models import FailureClass, SlurmProviderConfig

pytestmark = pytest.mark.anyio

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "slurm"


class FakeSlurm(Backend):
    """Jobs by name. ``errors``: raised by the next submits, in turn; with ``after_sbatch`` the
    job is made before the error (an answer lost on the way back)."""

    def __init__(self, *, locked: bool = False) -> None:
        self.provider = "cluster"
        self.locked_submit = locked
        self.jobs: dict[str, str] = {}
        self.errors: list[ProviderError] = []
        self.after_sbatch = False
        self.calls: Counter[str] = Counter()
        self.rows: list[JobRow] = []
        self.accounted: list[JobRow] = []
        self.ended: list[JobRow] = []
        self.end_files: dict[str, str] = {}
        self.waits: list[float] = []
        self.end_while_waiting: list[JobRow] = []
        self.cancelled: list[str] = []

    async def discover(
        self, ours: Callable[[str], bool] | None = None
    ) -> tuple[str | None, list[PartitionFacts], dict[str, float]]:
        return "fake", [], {}

    async def find(self, name: str, job_dir: str) -> str | None:
        self.calls["find"] += 1
        return self.jobs.get(name)

    async def submit(self, req: SlurmRequest, *, first: bool = False) -> str:
        self.calls["submit"] += 1
        if self.locked_submit and req.name in self.jobs:
            return self.jobs[req.name]
        if self.errors and not self.after_sbatch:
            raise self.errors.pop(0)
        self.calls["sbatch"] += 1
        self.jobs[req.name] = str(100 + len(self.jobs))
        if self.errors:
            raise self.errors.pop(0)
        return self.jobs[req.name]

    async def observe(
        self,
        names: Sequence[str],
        since_days: int,
        elements: Sequence[str] = (),
        *,
        end_files: Mapping[str, str] | None = None,
        wait_s: float = 0.0,
    ) -> tuple[list[JobRow], ...]:
        self.calls["observe"] += 1
        self.elements = list(elements)
        self.end_files = dict(end_files or {})
        self.waits.append(wait_s)
        live = [r for r in self.rows if r.name in names]
        if wait_s > 0:  # they end while the describe waits on the cluster
            self.ended += self.end_while_waiting
            self.end_while_waiting = []
        ended = [r for r in self.ended if r.element_id in self.end_files]
        return live, list(self.accounted), ended

    async def lookup(
        self, workdir: str, keys: Sequence[str]
    ) -> tuple[dict[str, KeyInfo], dict[str, str]]:
        self.calls["lookup"] += 1
        return {}, {}

    async def cancel(self, element_ids: Sequence[str]) -> None:
        self.cancelled += element_ids

    async def read_file(self, path: str, offset: int) -> bytes | None:
        return None


def launches(n: int, tag: str = "k") -> list[LaunchSpec]:
    return [
        LaunchSpec(
            key=f"{tag}{i:04d}",
            run_id=f"run{tag}{i}",
            attempt=1,
            pool="cluster/cpu",
            name="t",
            argv=["true"],
        )
        for i in range(n)
    ]


def driver(tmp_path: Path, backend: FakeSlurm) -> SlurmProvider:
    config = SlurmProviderConfig(host="login", workdir="/w")
    return SlurmProvider("cluster", config, state_dir=tmp_path / "state", backend=backend)


FACTS = Facts.of([Pool(id="cluster/cpu", provider="cluster", cpus=8, memory=8 << 30)])


def lost() -> TransportLost:
    return TransportLost("ssh: connection lost", provider="cluster", retryable=True)


def transient() -> ProviderError:
    return ProviderError("submit: Socket timed out", provider="cluster", retryable=True)


async def test_the_watch_reports_ends_and_asks_about_the_elements_it_waits_on(
    tmp_path: Path,
) -> None:
    """The driver's watch keeps the contract's (batches of news, terminal keys dropped) with
    its own cadence; each describe names the elements waited on, so the cluster reads
    accounting only once one of them left the queue."""
    assert SlurmProvider.watch is not Provider.watch  # spaced by cadence.next_poll
    backend = FakeSlurm()
    d = driver(tmp_path, backend)
    d.poll_min, d.poll_max = 0.01, 0.05
    (req,) = d.plan(launches(3), FACTS)
    assert isinstance(req, SlurmRequest)
    reports = await d.submit([req])
    backend.rows = [row(req.name, i, "RUNNING") for i in range(3)]
    keys = WatchSet()
    keys.add([r.key for r in reports], ProviderState.QUEUED)
    seen: dict[str, ProviderState] = {}
    with anyio.fail_after(10):
        async for batch in d.watch(keys, renew_every=60.0):
            seen.update({r.key: r.state for r in batch})
            if all(s is ProviderState.RUNNING for s in seen.values()):
                backend.rows = [row(req.name, i, "COMPLETED") for i in range(3)]
            if not len(keys):
                break
    assert set(seen.values()) == {ProviderState.SUCCEEDED}
    assert backend.elements == ["100_0", "100_1", "100_2"]
    counted = json.loads((tmp_path / "state" / "slurm" / "cluster" / "remote.json").read_text())
    assert (counted["commands"], counted["connects"]) == (0, 0)  # the fake runs none


async def test_a_transient_failure_is_raised_after_one_try(tmp_path: Path) -> None:
    backend = FakeSlurm()
    backend.errors = [transient(), transient()]
    d = driver(tmp_path, backend)
    reqs = d.plan(launches(3), FACTS)
    with pytest.raises(ProviderError) as e:
        await d.submit(reqs)
    assert e.value.retryable and "Socket timed out" in str(e.value)
    assert backend.calls["submit"] == 1 and not backend.jobs


@pytest.mark.parametrize("locked", [False, True], ids=["find-first", "locked-submit"])
async def test_the_shells_retry_of_a_lost_answer_finds_the_first_job(
    tmp_path: Path, locked: bool
) -> None:
    backend = FakeSlurm(locked=locked)
    backend.errors, backend.after_sbatch = [lost()], True
    d = driver(tmp_path, backend)
    reqs = d.plan(launches(3), FACTS)
    with pytest.raises(ProviderError) as e:  # sbatch may have run: retryable, not FAILED
        await d.submit(reqs)
    assert e.value.retryable
    # the shell retries with the same keys (here from a restarted control plane)
    again = driver(tmp_path, backend)
    reports = await again.submit(again.plan(launches(3), FACTS))
    assert [r.state for r in reports] == [ProviderState.QUEUED] * 3
    assert [r.job_id for r in reports] == ["100_0", "100_1", "100_2"]
    assert backend.calls["sbatch"] == 1 and len(backend.jobs) == 1
    assert backend.calls["find"] == (0 if locked else 1)


async def test_a_retry_replanned_with_fewer_keys_finds_the_first_array(tmp_path: Path) -> None:
    """The shell drops keys it no longer waits on: the smaller array has another name."""
    backend = FakeSlurm(locked=True)
    backend.errors, backend.after_sbatch = [lost()], True
    d = driver(tmp_path, backend)
    with pytest.raises(ProviderError):
        await d.submit(d.plan(launches(3), FACTS))
    (first,) = backend.jobs
    (smaller,) = d.plan(launches(3)[1:], FACTS)
    assert isinstance(smaller, SlurmRequest) and smaller.name != first
    reports = await d.submit([smaller])
    assert [(r.state, r.job_id) for r in reports] == [
        (ProviderState.QUEUED, "100_1"),
        (ProviderState.QUEUED, "100_2"),
    ]
    assert backend.calls["sbatch"] == 1


async def test_a_retry_replanned_after_nothing_was_submitted_submits(tmp_path: Path) -> None:
    backend = FakeSlurm()
    backend.errors = [transient()]
    d = driver(tmp_path, backend)
    with pytest.raises(ProviderError):
        await d.submit(d.plan(launches(3), FACTS))
    reports = await d.submit(d.plan(launches(3)[1:], FACTS))
    assert [r.state for r in reports] == [ProviderState.QUEUED] * 2
    assert backend.calls["sbatch"] == 1 and len(backend.jobs) == 1


async def test_a_refusal_fails_the_attempts(tmp_path: Path) -> None:
    backend = FakeSlurm()
    backend.errors = [ProviderError("sbatch refused: bad qos", provider="c", retryable=False)]
    d = driver(tmp_path, backend)
    reports = await d.submit(d.plan(launches(2), FACTS))
    assert [(r.state, r.failure) for r in reports] == [
        (ProviderState.FAILED, FailureClass.PROVIDER_REJECTED)
    ] * 2
    assert "bad qos" in reports[0].message and backend.calls["submit"] == 1


def row(name: str, index: int, state: str, reason: str = "None", node: str = "n1") -> JobRow:
    return JobRow(job_id="100", index=index, name=name, state=state, node=node, reason=reason)


async def test_describe_asks_the_cluster_every_time_in_one_call(tmp_path: Path) -> None:
    """No answers from a cache: spacing polls is the watch's job."""
    backend = FakeSlurm()
    d = driver(tmp_path, backend)
    ls = [*launches(2, "a"), msgspec.structs.replace(launches(1, "b")[0], cpus=2)]
    reqs = d.plan(ls, FACTS)
    assert len(reqs) == 2  # two arrays
    await d.submit(reqs)
    names = {r.keys[0]: r.name for r in reqs if isinstance(r, SlurmRequest)}
    backend.rows = [row(names["a0000"], 0, "RUNNING"), row(names["a0000"], 1, "PENDING")]
    keys = [x.key for x in ls]
    first = await d.describe(keys)
    second = await d.describe(keys)
    assert backend.calls["observe"] == 2  # one call per describe, for both arrays
    assert [r.state for r in first] == [
        ProviderState.RUNNING,
        ProviderState.QUEUED,
        ProviderState.UNKNOWN,
    ]
    assert first == second
    backend.rows = [row(names["a0000"], 0, "COMPLETED"), row(names["a0000"], 1, "COMPLETED")]
    assert (await d.describe(keys[:2]))[0].state is ProviderState.SUCCEEDED
    assert [r.state for r in await d.describe(keys[:2])] == [ProviderState.SUCCEEDED] * 2
    assert backend.calls["observe"] == 3  # finished keys are kept, not asked for again


async def test_cancel_finds_an_array_whose_submit_answer_was_lost(tmp_path: Path) -> None:
    backend = FakeSlurm()
    backend.errors, backend.after_sbatch = [lost()], True
    d = driver(tmp_path, backend)
    with pytest.raises(ProviderError):
        await d.submit(d.plan(launches(2), FACTS))
    await d.cancel([launches(2)[1].key])
    assert backend.cancelled == ["100_1"]


def captured() -> list[JobRow]:
    cap = FIX / "capacity"
    return parse_squeue((cap / "squeue.txt").read_text()) + parse_sacct(
        (cap / "sacct.txt").read_text()
    )


def test_capacity_reasons_in_captured_output() -> None:
    reasons = {capacity_reason(r.state, r.reason, r.node) for r in captured()}
    assert reasons == {
        None,
        "a job ended NODE_FAIL on n1",
        "jobs wait: ReqNodeNotAvail, UnavailableNodes:n2",
        "jobs wait: ReqNodeNotAvail",
    }
    quiet = parse_squeue((FIX / "squeue.txt").read_text())
    quiet += parse_sacct((FIX / "sacct.txt").read_text())
    assert {capacity_reason(r.state, r.reason, r.node) for r in quiet} == {None}


async def test_capacity_changes_are_pushed_once_per_new_reason(tmp_path: Path) -> None:
    backend = FakeSlurm()
    d = driver(tmp_path, backend)
    (req,) = d.plan(launches(2), FACTS)
    await d.submit([req])
    keys = list(req.keys)
    news = d.capacity_changes()
    drained = "ReqNodeNotAvail, UnavailableNodes:n2"
    backend.rows = [row(req.name, 0, "PENDING", drained), row(req.name, 1, "PENDING", drained)]
    await d.describe(keys)
    await d.describe(keys)  # the same news again: not pushed again
    backend.rows = [row(req.name, 0, "NODE_FAIL", node="n3"), row(req.name, 1, "RUNNING")]
    await d.describe(keys)
    assert await anext(news) == f"jobs wait: {drained}"
    assert await anext(news) == "a job ended NODE_FAIL on n3"
    backend.rows = [row(req.name, 1, "PENDING", drained)]  # it came back: pushed again
    await d.describe(keys)
    assert await anext(news) == f"jobs wait: {drained}"


async def test_a_late_repeated_submit_reports_the_final_states(tmp_path: Path) -> None:
    backend = FakeSlurm(locked=True)
    d = driver(tmp_path, backend)
    (req,) = d.plan(launches(2), FACTS)
    await d.submit([req])
    backend.rows = [row(req.name, 0, "COMPLETED"), row(req.name, 1, "FAILED")]
    final = await d.describe(req.keys)
    late = await d.submit([req])
    assert late == final and [r.state for r in late] == [
        ProviderState.SUCCEEDED,
        ProviderState.FAILED,
    ]
    assert backend.calls["sbatch"] == 1


async def test_the_first_discovery_begins_at_construction_and_is_used_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built where an event loop runs (the provider actor), the SSH driver starts its first
    discovery at once: the first ``discover`` takes that answer, the next asks again. Built
    outside one, nothing starts early."""
    from stowplan.providers.slurm import backend as backend_mod
    from stowplan.providers.slurm import driver as driver_mod

    asked: list[float] = []

    async def discover(
        self: object, ours: Callable[[str], bool] | None = None
    ) -> tuple[str | None, list[PartitionFacts], dict[str, float]]:
        asked.append(time.monotonic())
        return "fake", [], {}

    monkeypatch.setattr(backend_mod.SSHBackend, "discover", discover)
    config = SlurmProviderConfig(host="login", workdir="/w")
    d = SlurmProvider("cluster", config, state_dir=tmp_path / "state")
    await anyio.sleep(0)  # the early discovery runs as soon as the loop turns
    assert len(asked) == 1
    await d.discover()
    assert len(asked) == 1  # its answer
    await d.discover()
    assert len(asked) == 2  # a real rediscovery
    await d.aclose()
    # too old to stand for the first discovery: asked again
    monkeypatch.setattr(driver_mod, "EARLY_DISCOVERY_S", 0.0)
    asked.clear()
    d = SlurmProvider("cluster", config, state_dir=tmp_path / "state")
    await anyio.sleep(0.01)
    await d.discover()
    assert len(asked) == 2
    await d.aclose()
    # an early discovery that failed is not the first discover's answer: it asks again
    monkeypatch.setattr(driver_mod, "EARLY_DISCOVERY_S", 30.0)
    outage = [ProviderError("ssh: cannot connect", provider="cluster", retryable=True)]
    real = discover

    async def flaky(
        self: object, ours: Callable[[str], bool] | None = None
    ) -> tuple[str | None, list[PartitionFacts], dict[str, float]]:
        if outage:
            asked.append(time.monotonic())
            raise outage.pop()
        return await real(self, ours)

    monkeypatch.setattr(backend_mod.SSHBackend, "discover", flaky)
    asked.clear()
    d = SlurmProvider("cluster", config, state_dir=tmp_path / "state")
    await anyio.sleep(0.01)
    assert await d.discover() == [] and len(asked) == 2
    await d.aclose()
    # no loop running: nothing begins until asked
    asked.clear()
    outside = await anyio.to_thread.run_sync(
        lambda: SlurmProvider("cluster", config, state_dir=tmp_path / "state")
    )
    await anyio.sleep(0.01)
    assert asked == []
    await outside.aclose()


async def test_a_first_discovery_answered_elsewhere_is_never_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider actor answers its first discovery with the facts it was handed and says so
    as it builds the driver: the discovery begun at construction is withdrawn before the loop
    turns, so it never reaches the cluster; ``plan`` works from the handed facts alone, and
    the next ``discover`` asks the cluster itself."""
    from stowplan.providers.slurm import backend as backend_mod

    asked: list[float] = []

    async def discover(
        self: object, ours: Callable[[str], bool] | None = None
    ) -> tuple[str | None, list[PartitionFacts], dict[str, float]]:
        asked.append(time.monotonic())
        return "fake", [], {}

    monkeypatch.setattr(backend_mod.SSHBackend, "discover", discover)
    config = SlurmProviderConfig(host="login", workdir="/w")
    d = SlurmProvider("cluster", config, state_dir=tmp_path / "state")
    d.first_discovery_answered()
    await anyio.sleep(0.01)
    assert asked == []
    (req,) = d.plan(launches(2), FACTS)
    assert isinstance(req, SlurmRequest) and len(req.keys) == 2
    assert asked == []
    await d.discover()
    assert len(asked) == 1
    d.first_discovery_answered()  # nothing begun any more: nothing to withdraw
    await d.aclose()


async def test_end_records_end_elements_without_accounting_until_it_has_them(
    tmp_path: Path,
) -> None:
    """Over SSH each element writes an end record as it exits; the describe reads them with
    the queue: an element with one is final (its exit status, its times) though it is still
    COMPLETING in the queue; accounting replaces it only with a final state of its own."""
    backend = FakeSlurm()
    backend.reads_files = True
    d = driver(tmp_path, backend)
    (req,) = d.plan(launches(3), FACTS)
    assert isinstance(req, SlurmRequest)
    await d.submit([req])
    backend.rows = [row(req.name, 0, "COMPLETING"), row(req.name, 2, "RUNNING")]
    backend.ended = [
        JobRow(
            job_id="100",
            index=0,
            name="",
            state="COMPLETED",
            exit_code=0,
            node="n1",
            started_at=10.0,
            ended_at=12.5,
        ),
        JobRow(job_id="100", index=1, name="", state="FAILED", exit_code=3),
    ]
    # accounting still has element 1 running (it lags): the end record stands
    backend.accounted = [row(req.name, 1, "RUNNING")]
    reports = await d.describe(req.keys)
    assert backend.end_files == {f"100_{i}": f"{req.job_dir}/elements/{i}.end" for i in range(3)}
    assert [(r.state, r.exit_code) for r in reports] == [
        (ProviderState.SUCCEEDED, 0),
        (ProviderState.FAILED, 3),
        (ProviderState.RUNNING, None),
    ]
    assert (reports[0].started_at, reports[0].ended_at) == (10.0, 12.5)
    # the watch waits the end of its delay on the cluster (the backend reads files)
    d.poll_min, d.poll_max = 0.01, 0.05
    keys = WatchSet()
    keys.add([req.keys[2]], ProviderState.RUNNING)
    backend.end_while_waiting = [
        JobRow(job_id="100", index=2, name="", state="COMPLETED", exit_code=0)
    ]
    backend.waits.clear()
    watch = d.watch(keys)
    news = await anext(watch)  # a renewal of RUNNING first (never said before)
    if news[0].state is ProviderState.RUNNING:
        news = await anext(watch)
    assert [r.state for r in news] == [ProviderState.SUCCEEDED]
    # the first poll after keys were added waits nowhere; the next waits on the cluster
    assert backend.waits[0] == 0 and backend.waits[-1] > 0


async def test_reports_name_the_gpus_slurm_bound_from_the_end_records(tmp_path: Path) -> None:
    """Slurm binds the devices of a GPU array itself: each element's end record names them
    and its node, and the report carries both, also once accounting has the final state
    (which knows no indices); an element without an end record reports none."""
    backend = FakeSlurm()
    backend.reads_files = True
    d = driver(tmp_path, backend)
    gpu = [msgspec.structs.replace(x, pool="cluster/gpu", gpus=1) for x in launches(4)]
    facts = Facts.of([Pool(id="cluster/gpu", provider="cluster", cpus=16, gpus={"fake": 4})])
    (req,) = d.plan(gpu, facts)
    assert isinstance(req, SlurmRequest)
    await d.submit([req])

    def ended(index: int, node: str, devices: tuple[int, ...] | None) -> JobRow:
        return JobRow(
            job_id="100",
            index=index,
            name="",
            state="COMPLETED",
            exit_code=0,
            node=node,
            devices=devices,
        )

    backend.ended = [ended(0, "n3", (1,)), ended(1, "n4", (0,)), ended(2, "n4", None)]
    backend.rows = [row(req.name, 3, "RUNNING", node="n3")]
    # accounting has element 1 ended too, and element 3 not yet
    backend.accounted = [row(req.name, 1, "COMPLETED", node="n4")]
    reports = await d.describe(req.keys)
    assert [(r.state, r.node, r.devices) for r in reports] == [
        (ProviderState.SUCCEEDED, "n3", (1,)),
        (ProviderState.SUCCEEDED, "n4", (0,)),
        (ProviderState.SUCCEEDED, "n4", None),
        (ProviderState.RUNNING, "n3", None),
    ]
    # finished reports are kept with their devices
    again = await d.describe(req.keys[:2])
    assert [r.devices for r in again] == [(1,), (0,)]


class CountingSlurm(FakeSlurm):
    """A fake that counts one remote command per call, as the SSH backend does."""

    @property
    def commands(self) -> int:
        return sum(self.calls.values())


async def test_a_later_instance_adds_its_commands_to_those_counted_before(tmp_path: Path) -> None:
    """``stowplan run`` submits ahead with a driver of its own, then the provider actor's
    follows the same keys: ``remote.json`` counts both (and keeps both's calls), not only
    the last instance's."""
    path = tmp_path / "state" / "slurm" / "cluster" / "remote.json"
    first = driver(tmp_path, CountingSlurm())
    await first.submit(first.plan(launches(3), FACTS))
    before = json.loads(path.read_text())
    assert before["commands"] >= 1
    later_backend = CountingSlurm()
    later = driver(tmp_path, later_backend)
    await later.submit(later.plan(launches(3), FACTS))  # found in the index: no sbatch again
    await later.submit(later.plan(launches(2, "m"), FACTS))
    after = json.loads(path.read_text())
    assert after["commands"] == before["commands"] + later_backend.commands
    assert later_backend.commands >= 1
    assert [c[1] for c in after["calls"]][: len(before["calls"])] == [c[1] for c in before["calls"]]
    path.write_text("not json")  # a diagnostic: a broken file counts from nothing
    third_backend = CountingSlurm()
    third = driver(tmp_path, third_backend)
    await third.submit(third.plan(launches(2, "n"), FACTS))
    assert json.loads(path.read_text())["commands"] == third_backend.commands
