"""The slurmrestd transport (JWT) behind the same driver interface, on the real cluster."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stowplan.errors import ProviderError
from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Facts,
    LaunchSpec,
    ProviderState,
    Report,
)
from stowplan.providers.slurm import SlurmProvider
from stowplan.spec.models import FailureClass, SlurmProviderConfig
from tests.slurmcluster.cluster import SlurmCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A work directory the token's user (nobody) can write."""
    d = Path(tempfile.mkdtemp(prefix="stowplan-rest-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_rest_transport_submits_watches_and_classifies(
    slurm_cluster: SlurmCluster,
    slurm_rest: tuple[str, str],
    shared_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, token = slurm_rest
    monkeypatch.setenv("STOWPLAN_TEST_JWT", token)
    config = SlurmProviderConfig(
        host="127.0.0.1",
        user="nobody",
        transport="rest",
        rest_url=url,
        rest_token_env="STOWPLAN_TEST_JWT",
        workdir=str(shared_dir),
    )
    launches = [
        LaunchSpec(
            key=f"r{i:061x}",
            run_id=f"rest-{i}",
            attempt=1,
            pool="cluster/gpu",
            name="rest",
            argv=["sh", "-c", f'echo "gpu=$CUDA_VISIBLE_DEVICES" > out.txt; exit {3 * (i == 2)}'],
            memory=32 << 20,
            gpus=1,
            gpu_types=("fake",),
            outputs=["out.txt"],
        )
        for i in range(3)
    ]

    async def scenario() -> tuple[list[Report], list[Report], list[str | None]]:
        async with SlurmProvider("cluster", config, state_dir=tmp_path) as driver:
            pools = {p.id: p for p in await driver.discover()}
            # a queue: offered up to 120 times its 4 GPUs (REST reads no scheduler config, so
            # Slurm's default intervals; less if other work is pending; capacity.py)
            assert 4 <= pools["cluster/gpu"].gpus["fake"] <= 480
            reqs = driver.plan(launches, Facts.of(list(pools.values())))
            first = await driver.submit(reqs)
            again = await driver.submit(reqs)  # idempotent: finds the job by name
            assert [r.job_id for r in again] == [r.job_id for r in first]
            for _ in range(600):
                reports = await driver.describe([x.key for x in launches])
                if all(r.state in TERMINAL_PROVIDER_STATES for r in reports):
                    break
                await asyncio.sleep(0.2)
            with pytest.raises(ProviderError, match="logs") as e:
                async for _ in driver.logs(launches[0].key):
                    pass
            assert not e.value.retryable
            return first, reports, [r.job_id for r in first]

    first, reports, job_ids = asyncio.run(scenario())
    assert [r.state for r in first] == [ProviderState.QUEUED] * 3
    assert [r.state for r in reports] == [
        ProviderState.SUCCEEDED,
        ProviderState.SUCCEEDED,
        ProviderState.FAILED,
    ]
    assert reports[2].failure is FailureClass.USER_ERROR and reports[2].exit_code == 3
    for r in reports[:2]:
        text = Path(r.outputs["out.txt"]).read_text()
        assert text.strip() in ("gpu=0", "gpu=1")
    base = {j.split("_")[0] for j in job_ids if j}
    assert len(base) == 1, "one array for the three attempts"
    # the job ran as the token's user, and its logs are where the script put them
    (job_dir,) = (shared_dir / "jobs").iterdir()
    assert sorted(p.name for p in (job_dir / "logs").iterdir()) == [
        f"{i}.{s}" for i in range(3) for s in ("err", "out")
    ]
    assert os.stat(shared_dir / "runs").st_uid != 0
