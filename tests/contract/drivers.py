"""The harness of each driver the contract suite runs (see ``harness.Harness``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import anyio.to_thread

from stowplan.providers.base import Provider, ProviderState
from stowplan.providers.instant import InstantProvider
from stowplan.providers.launcher import LAUNCHES_FILE
from stowplan.providers.local import LocalProvider
from stowplan.simulator.cluster import ClusterSpec, FaultsSpec, parse_cluster
from stowplan.simulator.engine import Engine
from stowplan.simulator.faults import ApiFaults
from stowplan.simulator.provider import DataNet, SimProvider
from stowplan.simulator.workloads import SimJob
from stowplan.spec.models import LocalProviderConfig
from tests.contract.harness import Harness, Kind, subclass
from tests.kubecluster.kubelet import PodOutcome
from tests.unit.providers.test_local import _kill_leftovers

if TYPE_CHECKING:
    from tests.slurmcluster.cluster import SlurmCluster

S = ProviderState


class LocalHarness(Harness):
    """Processes on this machine; what it created: claimed attempt directories, and any
    second start of one (the ``launches`` file each launcher appends to)."""

    name = "local"
    pool = "local"
    expected: ClassVar[Mapping[Kind, ProviderState | None]] = {
        "quick": S.SUCCEEDED,
        "fail": S.FAILED,
        "long": None,
    }

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.state_dir = tmp / ".stowplan"
        self._dirs: set[Path] = set()

    def new_driver(
        self, *, state_dir: Path | None = None, wrap: type[Provider] | None = None
    ) -> Provider:
        where = state_dir if state_dir is not None else self.state_dir
        self._dirs.add(where)
        config = LocalProviderConfig(cpus=4, memory=4 << 30)
        return subclass(LocalProvider, wrap)(self.name, config, state_dir=where)

    async def advance(self, driver: Provider) -> None:
        await anyio.sleep(0.05)

    async def created(self, driver: Provider) -> int:
        def count() -> int:
            runs = self.state_dir / "runs"
            claims = [d for d in runs.glob("*/*") if d.is_dir() and d.parent.name != ".keys"]
            # each claim is started at most once: count a second start as a second job
            again = sum(
                max(0, len((d / LAUNCHES_FILE).read_text().splitlines()) - 1)
                for d in claims
                if (d / LAUNCHES_FILE).exists()
            )
            return len(claims) + again

        return await anyio.to_thread.run_sync(count)

    def cleanup(self) -> None:
        for d in self._dirs:
            _kill_leftovers(d)


class InstantHarness(Harness):
    """Runs nothing: every launch succeeds at once."""

    name = "instant"
    pool = "instant"
    expected: ClassVar[Mapping[Kind, ProviderState | None]] = {
        "quick": S.SUCCEEDED,
        "fail": S.SUCCEEDED,
        "long": S.SUCCEEDED,
    }

    def new_driver(
        self, *, state_dir: Path | None = None, wrap: type[Provider] | None = None
    ) -> Provider:
        return subclass(InstantProvider, wrap)(self.name, state_dir=state_dir)

    async def advance(self, driver: Provider) -> None:
        await anyio.sleep(0.01)

    async def created(self, driver: Provider) -> int:
        assert isinstance(driver, InstantProvider)
        return driver.submitted_count


SIM_CLUSTER = """\
[cluster]
name = "contract"
[[sites]]
name = "site"
[[pools]]
name = "cpu"
site = "site"
kind = "slurm"
nodes = 2
cpus_per_node = 4
memory_per_node = "8GiB"
[[pools]]
name = "batch"
site = "site"
kind = "kubernetes"
nodes = 1
cpus_per_node = 2
memory_per_node = "4GiB"
[[pools]]
name = "cloud"
site = "site"
kind = "cloud"
max_instances = 2
cpus_per_node = 4
memory_per_node = "8GiB"
boot = "30s"
"""
SIM_JOBS: Mapping[str, SimJob] = {
    "quick": SimJob(id="quick", submit=0.0, duration=1.0),
    # more CPUs than any node has: refused when the pool first tries it
    "fail": SimJob(id="fail", submit=0.0, duration=1.0, cpus=64.0),
    "long": SimJob(id="long", submit=0.0, duration=None),  # a service: runs until cancelled
}


class SimHarness(Harness):
    """The simulator's provider over a tiny cluster, in virtual time: ``advance`` runs the
    engine's next event. A launch's name picks its simulated job (``SIM_JOBS``)."""

    name = "sim"
    pool = "cpu"
    elastic_pool = "cloud"
    timeout = 5.0
    expected: ClassVar[Mapping[Kind, ProviderState | None]] = {
        "quick": S.SUCCEEDED,
        "fail": S.FAILED,
        "long": None,
    }

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.spec: ClusterSpec = parse_cluster(SIM_CLUSTER, tmp / "contract.toml")
        self.engine = Engine(seed=1)

    def new_driver(
        self, *, state_dir: Path | None = None, wrap: type[Provider] | None = None
    ) -> Provider:
        return subclass(SimProvider, wrap)(
            "site",
            self.spec.pools,
            self.engine,
            jobs=SIM_JOBS.__getitem__,
            data=DataNet(self.spec),
            faults=ApiFaults(self.engine, "site", FaultsSpec()),
        )

    async def advance(self, driver: Provider) -> None:
        if len(self.engine):
            self.engine.step()
            await anyio.sleep(0)
        else:
            await anyio.sleep(0.01)

    async def created(self, driver: Provider) -> int:
        assert isinstance(driver, SimProvider)
        return len(driver.attempts)


class SlurmHarness(Harness):
    """The session's real Slurm cluster over SSH (``tests/slurmcluster``). What it created:
    the distinct jobs (arrays) squeue and sacct know under this harness's job names."""

    name = "slurm"
    pool = "cluster/cpu"
    timeout = 120.0
    expected: ClassVar[Mapping[Kind, ProviderState | None]] = {
        "quick": S.SUCCEEDED,
        "fail": S.FAILED,
        "long": None,
    }

    def __init__(self, tmp: Path, cluster: SlurmCluster) -> None:
        super().__init__(tmp)
        self.cluster = cluster
        self.workdir = tmp / "remote"

    def new_driver(
        self, *, state_dir: Path | None = None, wrap: type[Provider] | None = None
    ) -> Provider:
        from stowplan.providers.slurm import SlurmProvider
        from stowplan.spec.models import SlurmProviderConfig

        facts = self.cluster.facts
        assert facts is not None
        config = SlurmProviderConfig(
            host="127.0.0.1",
            port=facts.ssh_port,
            user=facts.ssh_user,
            identity_file=facts.identity_file,
            known_hosts=facts.known_hosts,
            slurm_conf=facts.slurm_conf,
            workdir=str(self.workdir),
        )
        where = state_dir if state_dir is not None else self.tmp / "state"
        return subclass(SlurmProvider, wrap)("cluster", config, state_dir=where)

    async def advance(self, driver: Provider) -> None:
        await anyio.sleep(0.5)

    def _names(self) -> list[str]:
        return sorted(p.name for p in (self.workdir / "jobs").glob("*") if p.is_dir())

    async def created(self, driver: Provider) -> int:
        def count() -> int:
            names = self._names()
            if not names:
                return 0
            wanted = set(names)
            jobs: set[tuple[str, str]] = set()
            # every state: a finished job stays in slurmctld for MinJobAge (300 s here) while
            # sacct may not have it yet, so a fast job is never missed between the two
            live = self.cluster.slurm("squeue", "-h", "-r", "-t", "all", "-o", "%j|%F", check=False)
            acct = self.cluster.slurm(
                "sacct", "-X", "-n", "-P", "-D", "-S", "now-1days",
                f"--name={','.join(names)}", "--format=JobName,JobID",
            )  # fmt: skip
            for line in [*live.splitlines(), *acct.splitlines()]:
                name, _, job = line.partition("|")
                if name in wanted:
                    jobs.add((name, job.split("_")[0]))
            return len(jobs)

        return await anyio.to_thread.run_sync(count)

    def cleanup(self) -> None:
        names = self._names()
        if names:
            self.cluster.slurm("scancel", f"--name={','.join(names)}", check=False)


class KubernetesHarness(Harness):
    """The Kubernetes driver against the emulated API server (``tests/kubecluster``), one
    cluster per harness, over real HTTP with a token kubeconfig. The emulator's kubelet runs no
    containers: each pod's outcome follows the launch it carries (the ``task`` of its entry in
    the Job's ConfigMap is the launch's name, which is its kind), with the log the wrapper's
    command would write. What it created: the Jobs the API server answered 201 to."""

    name = "kubernetes"
    pool = "k8s/cpu"
    elastic_pool = "k8s/burst"
    expected: ClassVar[Mapping[Kind, ProviderState | None]] = {
        "quick": S.SUCCEEDED,
        "fail": S.FAILED,
        "long": None,
    }

    def __init__(self, tmp: Path) -> None:
        from tests.kubecluster import KubeCluster, NodeSpec

        super().__init__(tmp)
        self.cluster = KubeCluster(bookmark_interval=0.2)
        self.cluster.start()
        try:
            for i in (1, 2):
                self.cluster.add_node(NodeSpec(name=f"cpu-{i}", pool="cpu", cpu="4", memory="8Gi"))
            self.kubeconfig = self.cluster.kubeconfig(tmp / "kubeconfig")
        except BaseException:
            self.cluster.stop()
            raise
        self.cluster.set_pod_behaviour(self._outcome)

    def _outcome(self, pod: dict[str, Any]) -> PodOutcome | None:
        """Runs on the emulator's loop: reads its store directly."""
        from tests.kubecluster.store import RESOURCES

        labels = pod["metadata"]["labels"]
        cm = self.cluster.emulator.store.get(
            RESOURCES[("", "configmaps")],
            pod["metadata"]["namespace"],
            labels["batch.kubernetes.io/job-name"],
        )
        if cm is None:
            return None
        idx = labels["batch.kubernetes.io/job-completion-index"]
        kind = json.loads(cm["data"][f"{idx}.json"])["task"]
        return {
            "quick": PodOutcome("succeed", log="contract-ok\n"),
            "fail": PodOutcome("fail", exit_code=3, log="contract-fail\n"),
            "long": PodOutcome("run"),
        }.get(kind)

    def new_driver(
        self, *, state_dir: Path | None = None, wrap: type[Provider] | None = None
    ) -> Provider:
        from stowplan.providers.kubernetes import KubernetesProvider
        from stowplan.spec.models import (
            KubernetesAutoscaleSpec,
            KubernetesProviderConfig,
            NodeShapeSpec,
        )

        config = KubernetesProviderConfig(
            kubeconfig=str(self.kubeconfig),
            image="python:3.12-slim",
            # a pool the cluster's autoscaler would grow from zero: provision starts nothing
            autoscale={
                "burst": KubernetesAutoscaleSpec(
                    node=NodeShapeSpec(cpus=4, memory="8GiB"), max_nodes=2
                )
            },
        )
        where = state_dir if state_dir is not None else self.tmp / ".stowplan"
        return subclass(KubernetesProvider, wrap)("k8s", config, state_dir=where)

    async def advance(self, driver: Provider) -> None:
        await anyio.sleep(0.05)

    async def created(self, driver: Provider) -> int:
        return sum(
            1
            for r in list(self.cluster.requests)
            if r.method == "POST" and r.status == 201 and r.path.endswith("/jobs")
        )

    def cleanup(self) -> None:
        self.cluster.stop()


HARNESSES: Mapping[str, type[Harness]] = {
    h.name: h for h in (LocalHarness, InstantHarness, SimHarness, SlurmHarness, KubernetesHarness)
}
"""Every driver's harness, by the id its test cases carry."""
