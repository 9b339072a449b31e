"""The local provider's devices: discovery describes them, the core leases device indices, and
the launcher exports exactly those as ``CUDA_VISIBLE_DEVICES``. Fake GPUs (and the captured
``nvidia-smi`` of an H200 host) stand in for real ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stowplan.placement.leases import MILLI, DeviceLease, NodeDevices, PoolDevices
from stowplan.placement.problem import Pool
from stowplan.provenance.nvidia import GpuInfo, parse_nvidia_smi_xml
from stowplan.providers.base import LaunchSpec
from stowplan.providers.local.attempts import claim, current_claim
from stowplan.providers.local.capacity import Capacity, Started, gpu_model, local_devices
from stowplan.providers.local.render import LocalRequest, plan_one
from stowplan.scheduler.reports import ProviderState
from tests.unit.scheduler.test_core import Harness, items, task

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "hosts"
LAUNCHER = [sys.executable, "-m", "stowplan.providers.launcher", "--foreground"]


def fake_gpus(n: int, name: str = "NVIDIA A100-SXM4-80GB") -> list[GpuInfo]:
    return [
        GpuInfo(
            index=i,
            uuid=f"GPU-{i:08d}",
            name=name,
            driver_version="580.0",
            cuda_version="13.0",
            memory_total_bytes=80 << 30,
        )
        for i in range(n)
    ]


def test_discovery_describes_each_device() -> None:
    got = local_devices(2, fake_gpus(4), node="box")
    assert got == PoolDevices(
        nodes=(NodeDevices(name="box", model="a100-sxm4-80gb", devices=(MILLI, MILLI)),),
        sharing=True,
    )
    assert local_devices(0, fake_gpus(4), node="box") is None
    # nothing found (no driver): the configured count is trusted
    assert local_devices(3, [], node="box", model="unknown") == PoolDevices(
        nodes=(NodeDevices(name="box", model="unknown", devices=(MILLI,) * 3),), sharing=True
    )


def test_discovery_from_a_captured_nvidia_smi() -> None:
    found = parse_nvidia_smi_xml((FIXTURES / "h200-x1" / "nvidia-smi-q-x.xml").read_text())
    got = local_devices(1, found, node="h200-x1")
    assert got is not None and gpu_model(found[0]) == "h200"
    assert got.nodes == (NodeDevices(name="h200-x1", model="h200", devices=(MILLI,)),)


def launch(tmp_path: Path, name: str, lease: DeviceLease | None, env: dict[str, str]) -> str:
    """Run the launcher on an attempt whose spec carries ``lease`` as the driver writes it;
    return the CUDA_VISIBLE_DEVICES the task saw ("<unset>" if none)."""
    d = tmp_path / name
    d.mkdir()
    spec: dict[str, object] = {
        "argv": ["bash", "-c", 'echo "${CUDA_VISIBLE_DEVICES-<unset>}" > seen.txt'],
        "env": env,
    }
    if lease is not None:
        spec["devices"] = list(lease.devices)
    (d / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([*LAUNCHER, str(d)], timeout=15, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    return (d / "seen.txt").read_text().strip()


def test_cuda_visible_devices_is_the_lease(tmp_path: Path) -> None:
    devices = local_devices(4, fake_gpus(4), node="box")
    pool = Pool(
        id="local",
        provider="local",
        cpus=16,
        memory=64 << 30,
        gpus={"a100-sxm4-80gb": 4},
        devices=devices,
    )
    h = Harness(pool)
    out = h.submit(task("a", gpus=1), task("b", gpus=2), task("cpu"))
    leases = {i.run_id: i.lease for i in items(out)}
    a, b = leases["a"], leases["b"]
    # a CPU-only run on a machine whose GPUs are leased holds none of them
    assert leases["cpu"] == DeviceLease("box", ()) == h.core.lease("cpu")
    assert a is not None and b is not None and not set(a.devices) & set(b.devices)
    # the task's own CUDA_VISIBLE_DEVICES does not override the lease
    assert launch(tmp_path, "a", a, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == a.visible()
    assert launch(tmp_path, "b", b, {}) == b.visible() and len(b.visible().split(",")) == 2
    # a CPU-only attempt on a pool that knows its devices sees none
    assert launch(tmp_path, "cpu", leases["cpu"], {}) == ""
    # no lease (a pool counting GPUs only): the environment is left alone
    assert launch(tmp_path, "plain", None, {}) == "<unset>"
    # a freed device is leased again: the next run gets exactly what the first gave back
    h.report("a", ProviderState.SUCCEEDED, provider="local")
    out = h.submit(task("c", gpus=1))
    [c] = [i.lease for i in items(out)]
    assert c is not None and c.devices == a.devices


def local_request(
    runs: Path, key: str, lease: DeviceLease | None, *, gpus: int | None = None, milli: int = MILLI
) -> LocalRequest:
    """The local driver's request for a no-op attempt on ``lease`` (its devices' count of
    GPUs, unless ``gpus`` says), taking ``milli`` of each."""
    spec = LaunchSpec(
        key=key,
        run_id=f"run-{key}",
        attempt=1,
        pool="local",
        name="train",
        argv=["true"],
        gpus=gpus if gpus is not None else len(lease.devices) if lease is not None else 0,
        gpu_milli=milli,
        lease=lease,
    )
    return plan_one(spec, provider="local", runs=runs, path_prefix="", has_gpus=True)


def test_the_lease_reaches_the_attempt_and_the_fifo_keeps_devices_apart(tmp_path: Path) -> None:
    def request(key: str, lease: DeviceLease | None) -> LocalRequest:
        return local_request(tmp_path, key, lease)

    first = request("k1", DeviceLease("box", (1, 3)))
    assert first.devices == (1, 3)
    assert "CUDA_VISIBLE_DEVICES=1,3" in first.render()
    assert request("k0", None).devices is None
    # what the launcher reads: spec.json carries the devices
    assert claim(first, current_claim(), provider="local")
    written = json.loads((Path(first.attempt_dir) / "spec.json").read_text())
    assert written["devices"] == [1, 3]
    # the core may lease device 3 again as soon as it sent the cancel of the first: the
    # FIFO starts the next attempt there only once the first no longer holds it
    cap = Capacity(cpus=8, memory=64 << 30, gpus=4)
    held = Started(dir=tmp_path, cpus=1, memory=1 << 30, gpus=2, since=0.0, devices=(1, 3))
    assert not cap.fits([held], request("k2", DeviceLease("box", (3,))))
    assert cap.fits([held], request("k3", DeviceLease("box", (0, 2))))
    # following an attempt in its place: only on the devices it held
    assert cap.within(held, request("k4", DeviceLease("box", (1,))))
    assert not cap.within(held, request("k5", DeviceLease("box", (0,))))


def test_shares_of_a_device_start_together_until_it_is_full(tmp_path: Path) -> None:
    def request(key: str, device: int, milli: int) -> LocalRequest:
        return local_request(tmp_path, key, DeviceLease("box", (device,)), milli=milli)

    quarter = request("q", 0, 250)
    assert quarter.gpu_milli == 250 and "gpus=0.25 " in quarter.render()
    # spec.json keeps the share, so a restarted driver counts what the attempt holds
    assert claim(quarter, current_claim(), provider="local")
    written = json.loads((Path(quarter.attempt_dir) / "spec.json").read_text())
    assert written["gpu_milli"] == 250 and written["devices"] == [0]
    cap = Capacity(cpus=8, memory=64 << 30, gpus=2)

    def held(device: int, milli: int) -> Started:
        return Started(
            dir=tmp_path,
            cpus=1,
            memory=1 << 30,
            gpus=1,
            since=0.0,
            gpu_milli=milli,
            devices=(device,),
        )

    three = [held(0, 250), held(0, 250), held(0, 250)]
    # a fourth quarter fits beside three on device 0; a half does not
    assert cap.fits(three, request("q4", 0, 250))
    assert not cap.fits(three, request("h", 0, 500))
    # a whole GPU waits for every share on its device to end, not for the other device's
    assert not cap.fits([held(0, 250)], request("w", 0, MILLI))
    assert cap.fits([held(0, 250)], request("w", 1, MILLI))
    # the machine's GPUs are counted in thousandths: two whole and a share are too many
    assert not cap.fits([held(0, MILLI), held(1, 750)], request("q5", 1, 500))
    # following a share in its place asks no more than it held
    assert cap.within(held(0, 500), request("f", 0, 250))
    assert not cap.within(held(0, 250), request("g", 0, 500))
