"""Session fixtures shared by more than one test directory.

The Slurm test cluster (munge, slurmdbd with MariaDB, slurmctld, four slurmd, sshd) is started
at most once per session, whichever directories use it (``tests/integration/slurm/``, the
provider contract suite in ``tests/contract/``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurmcluster.cluster import ClusterFacts, SlurmCluster, missing_programs

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
INSTALL = Path(__file__).resolve().parent / "slurmcluster" / "install.sh"


def _unavailable(why: str) -> None:
    if CI:
        pytest.fail(f"the Slurm test cluster cannot start: {why}")
    pytest.skip(f"the Slurm test cluster cannot start: {why}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        _unavailable("it needs root (it runs munged, slurmctld, slurmd and sshd)")
    if missing_programs():
        r = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True)
        if r.returncode != 0 or missing_programs():
            _unavailable(f"install.sh failed: {r.stderr[-1500:]} (missing {missing_programs()})")
    # not under pytest's basetemp: a concurrent pytest may prune those directories
    base = Path(tempfile.mkdtemp(prefix="stowplan-slurm-"))
    cluster = SlurmCluster(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def facts(slurm_cluster: SlurmCluster) -> ClusterFacts:
    assert slurm_cluster.facts is not None
    return slurm_cluster.facts
