"""The driver's own verbs on the real cluster: idempotent cancel, logs followed to the end,
and re-attaching from a fresh driver that has no local index (keys found in the job scripts)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Facts,
    LaunchSpec,
    ProviderState,
    Report,
)
from stowplan.providers.slurm import SlurmProvider
from stowplan.spec.models import SlurmProviderConfig
from tests.slurmcluster.cluster import SlurmCluster

pytestmark = pytest.mark.integration


def _config(cluster: SlurmCluster, workdir: Path) -> SlurmProviderConfig:
    facts = cluster.facts
    assert facts is not None
    return SlurmProviderConfig(
        host="127.0.0.1",
        port=facts.ssh_port,
        user=facts.ssh_user,
        identity_file=facts.identity_file,
        known_hosts=facts.known_hosts,
        slurm_conf=facts.slurm_conf,
        workdir=str(workdir),
    )


def _launch(i: int, argv: list[str], outputs: list[str] | None = None) -> LaunchSpec:
    return LaunchSpec(
        key=f"d{i:061x}",
        run_id=f"drv-{i}",
        attempt=1,
        pool="cluster/cpu",
        name="drv",
        argv=argv,
        memory=32 << 20,
        outputs=outputs or [],
    )


async def _until_final(driver: SlurmProvider, keys: list[str]) -> list[Report]:
    for _ in range(900):
        reports = await driver.describe(keys)
        if all(r.state in TERMINAL_PROVIDER_STATES for r in reports):
            return reports
        await asyncio.sleep(0.1)
    raise AssertionError(f"not final: {reports}")


def test_cancel_is_idempotent_and_logs_follow(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    config = _config(slurm_cluster, tmp_path / "remote")
    sleeper = _launch(0, ["sleep", "300"])
    talker = _launch(1, ["sh", "-c", "for i in 1 2 3; do echo line $i; sleep 1; done"])

    async def scenario() -> tuple[list[Report], bytes, list[Report]]:
        async with SlurmProvider("cluster", config, state_dir=tmp_path / "state") as driver:
            facts = Facts.of(await driver.discover())
            await driver.submit(driver.plan([sleeper], facts))
            await driver.submit(driver.plan([talker], facts))
            chunks = [c async for c in driver.logs(talker.key, follow=True)]
            await driver.cancel([sleeper.key])
            await driver.cancel([sleeper.key, "never-submitted"])  # again: no error
            final = await _until_final(driver, [sleeper.key, talker.key])
            await driver.cancel([sleeper.key, talker.key])  # both finished: no error
        # a fresh driver with an empty state directory finds the keys in the job scripts
        async with SlurmProvider("cluster", config, state_dir=tmp_path / "fresh") as fresh:
            again = await fresh.describe([sleeper.key, talker.key, "never-submitted"])
        return final, b"".join(chunks), again

    final, log, again = asyncio.run(scenario())
    assert log == b"line 1\nline 2\nline 3\n"
    assert [r.state for r in final] == [ProviderState.CANCELLED, ProviderState.SUCCEEDED]
    assert final[1].exit_code == 0 and final[1].node in ("n1", "n2", "n3", "n4")
    assert [r.state for r in again] == [
        ProviderState.CANCELLED,
        ProviderState.SUCCEEDED,
        ProviderState.UNKNOWN,
    ]
    assert [r.job_id for r in again[:2]] == [r.job_id for r in final]


def test_the_same_keys_in_another_workdir_are_another_job(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """Two projects (or two checkouts) with the same run ids make the same keys and so the
    same job names. Each project's submit runs its own job: a job of that name started from
    another workdir is not "already submitted"."""
    launch = _launch(7, ["sh", "-c", "echo here > where.txt"], outputs=["where.txt"])

    async def one(workdir: Path, state: Path) -> Report:
        config = _config(slurm_cluster, workdir)
        async with SlurmProvider("cluster", config, state_dir=state) as driver:
            await driver.submit(driver.plan([launch], Facts.of(await driver.discover())))
            (final,) = await _until_final(driver, [launch.key])
            return final

    first = asyncio.run(one(tmp_path / "a", tmp_path / "state-a"))
    second = asyncio.run(one(tmp_path / "b", tmp_path / "state-b"))
    assert first.state is second.state is ProviderState.SUCCEEDED
    assert first.job_id != second.job_id
    for workdir in ("a", "b"):
        assert (tmp_path / workdir / "runs" / "drv-7" / "1" / "where.txt").read_text() == "here\n"
