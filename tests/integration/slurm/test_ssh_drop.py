"""The SSH connection drops during a submit; the retried submit leaves exactly one job.

A small TCP proxy between the driver and sshd, controlled by the test, cuts every connection
either as soon as the job script has been sent, or after sbatch ran but before its answer got
back (replies are held until the job's ``jobid`` file exists on the cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Literal

import pytest

from stowplan.errors import ProviderError
from stowplan.providers.base import Facts, LaunchSpec, ProviderState
from stowplan.providers.slurm import SlurmProvider, SlurmRequest
from stowplan.spec.models import SlurmProviderConfig
from tests.slurmcluster.cluster import SlurmCluster

from ..conftest import wait_for

pytestmark = pytest.mark.integration


class CuttingProxy:
    """Forwards 127.0.0.1:port to the target; ``arm`` makes it act after N client bytes."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.threshold: int | None = None
        self.sent_since_arm = 0
        self.holding = False
        self.mode: Literal["cut", "hold", "always"] = "cut"
        self.cuts = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, threshold: int, mode: Literal["cut", "hold", "always"]) -> None:
        with self.lock:
            self.threshold, self.sent_since_arm, self.mode = threshold, 0, mode

    def cut(self) -> None:
        """Drop every connection and disarm: connections made after this one get through."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
            self.threshold, self.holding = None, False
            self.cuts += 1
        self._close(pairs)

    @staticmethod
    def _close(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.closed = True
        # NOTE: close() alone leaves the port listening while _accept is blocked in accept();
        # shutdown() wakes it, so after close() connections are refused
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.cut()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not upstream:
                    while self.holding:  # replies wait (and are dropped by the cut)
                        time.sleep(0.01)
                        if src.fileno() < 0:
                            return
                dst.sendall(data)
                if upstream:
                    self._count(len(data))
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _count(self, n: int) -> None:
        # decide and take the connections to drop under one lock: a drop decided here must not
        # reach a connection made after the test disarmed the proxy with cut()
        with self.lock:
            if self.threshold is None:
                return
            self.sent_since_arm += n
            if self.sent_since_arm < self.threshold:
                return
            act = self.mode
            if act == "always":  # stays armed: every connection is cut in turn
                self.sent_since_arm = 0
            else:
                self.threshold = None
            if act == "hold":
                self.holding = True
                return
            pairs, self.pairs = self.pairs, []
            self.cuts += 1
        self._close(pairs)


def _launches(tag: str) -> list[LaunchSpec]:
    return [
        LaunchSpec(
            key=f"{tag}{i:060x}",
            run_id=f"drop-{tag}-{i}",
            attempt=1,
            pool="cluster/cpu",
            name="drop",
            argv=["sleep", "1"],
            memory=32 << 20,
        )
        for i in range(3)
    ]


@pytest.mark.parametrize("mode", ["cut", "hold"])
def test_submit_survives_a_dropped_connection(
    slurm_cluster: SlurmCluster, tmp_path: Path, mode: Literal["cut", "hold"]
) -> None:
    facts = slurm_cluster.facts
    assert facts is not None
    proxy = CuttingProxy(facts.ssh_port)
    workdir = tmp_path / "remote"
    # known_hosts names the real port; the proxy's port is another host entry
    known = tmp_path / "known_hosts"
    line = Path(facts.known_hosts).read_text().split(" ", 1)[1]
    known.write_text(f"[127.0.0.1]:{proxy.port} {line}")
    config = SlurmProviderConfig(
        host="127.0.0.1",
        port=proxy.port,
        user=facts.ssh_user,
        identity_file=facts.identity_file,
        known_hosts=str(known),
        slurm_conf=facts.slurm_conf,
        workdir=str(workdir),
        connections=1,
    )
    launches = _launches("a" if mode == "cut" else "b")

    async def scenario() -> tuple[list[ProviderState], list[str | None], int]:
        async with SlurmProvider("cluster", config, state_dir=tmp_path / "state") as driver:
            # connected and authenticated before arming
            (req,) = driver.plan(launches, Facts.of(await driver.discover()))
            assert isinstance(req, SlurmRequest)
            proxy.arm(len(req.script), mode)
            if mode == "hold":

                def cut_after_sbatch() -> None:
                    wait_for((workdir / "jobs" / req.name / "jobid").exists, 60, "sbatch to run")
                    proxy.cut()

                cutter = asyncio.create_task(asyncio.to_thread(cut_after_sbatch))
                reports = await driver.submit([req])
                await cutter
            else:
                reports = await driver.submit([req])
            return (
                [r.state for r in reports],
                [r.job_id for r in reports],
                driver.backend.connects,
            )

    try:
        states, job_ids, connects = asyncio.run(scenario())
    finally:
        proxy.close()
    assert proxy.cuts >= 1 and connects >= 2, "the connection was never cut"
    assert states == [ProviderState.QUEUED] * 3
    (name,) = [p.name for p in (workdir / "jobs").iterdir()]

    def elements() -> list[str]:
        out = slurm_cluster.slurm(
            "sacct", "-X", "-n", "-P", "-D", "-S", "now-1days", f"--name={name}", "--format=JobID"
        )
        return out.split()

    # accounting records reach slurmdbd a moment after the jobs start
    wait_for(lambda: len(elements()) >= 3, 60, "the array's three elements in sacct")
    assert len({e.split("_")[0] for e in elements()}) == 1, f"more than one job: {elements()}"
    assert sorted(elements()) == sorted(j or "" for j in job_ids), "the retry reported another job"


def test_submit_whose_every_try_is_cut_is_retried_by_the_shell_and_runs_once(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """No answer ever comes back: the submit must not report a failure (a retry under a new
    key could run it twice); it raises a retryable error, and the shell's retry with the same
    keys, once the link is back, finds the job if a try did submit it: one job, whatever
    happened."""
    facts = slurm_cluster.facts
    assert facts is not None
    proxy = CuttingProxy(facts.ssh_port)
    workdir = tmp_path / "remote"
    known = tmp_path / "known_hosts"
    line = Path(facts.known_hosts).read_text().split(" ", 1)[1]
    known.write_text(f"[127.0.0.1]:{proxy.port} {line}")
    config = SlurmProviderConfig(
        host="127.0.0.1",
        port=proxy.port,
        user=facts.ssh_user,
        identity_file=facts.identity_file,
        known_hosts=str(known),
        slurm_conf=facts.slurm_conf,
        workdir=str(workdir),
        connections=1,
    )
    launches = _launches("c")

    async def scenario() -> tuple[ProviderError, list[ProviderState], list[str | None], bool]:
        async with SlurmProvider("cluster", config, state_dir=tmp_path / "state") as driver:
            (req,) = driver.plan(launches, Facts.of(await driver.discover()))
            assert isinstance(req, SlurmRequest)
            proxy.arm(len(req.script), "always")
            with pytest.raises(ProviderError) as cut:
                await driver.submit([req])
            proxy.cut()  # disarms: the link works again
            tried = (workdir / "jobs" / req.name / "jobid").exists()
            # the shell's retry: the same request, the same keys
            again = await driver.submit([req])
            return cut.value, [r.state for r in again], [r.job_id for r in again], tried

    try:
        error, states, job_ids, tried = asyncio.run(scenario())
    finally:
        proxy.close()
    assert error.retryable, error
    assert states == [ProviderState.QUEUED] * 3
    (name,) = [p.name for p in (workdir / "jobs").iterdir()]

    def elements() -> list[str]:
        out = slurm_cluster.slurm(
            "sacct", "-X", "-n", "-P", "-D", "-S", "now-1days", f"--name={name}", "--format=JobID"
        )
        return out.split()

    wait_for(lambda: len(elements()) >= 3, 60, "the array's three elements in sacct")
    assert len({e.split("_")[0] for e in elements()}) == 1, f"more than one job: {elements()}"
    reported = sorted(j or "" for j in job_ids)
    assert sorted(elements()) == reported, f"the retry reported another job ({tried=})"
