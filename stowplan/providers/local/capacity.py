"""What the attempts this driver started hold of the machine, and whether the next one fits.

The driver counts the CPUs, memory and GPUs of the attempts it started (and of running attempts
an earlier instance started, once described) against the configured capacity; see the FIFO in
``driver.py`` for how requests wait. ``local_devices`` describes the machine's GPUs by device
for discovery (``Pool.devices``), so the scheduler core leases device indices and the launcher
exports them as ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from msgspec import Struct

from stowplan.placement.leases import MILLI, NodeDevices, PoolDevices
from stowplan.provenance.nvidia import GpuInfo
from stowplan.providers.local.render import LocalRequest


class Started(Struct, kw_only=True):
    """Capacity held by an attempt this instance started (or found running)."""

    dir: Path
    cpus: float
    memory: int
    gpus: int
    since: float
    gpu_milli: int = MILLI
    """thousandths of each of its GPUs it holds (below ``MILLI``: a share of one device)."""
    launcher: subprocess.Popen[bytes] | None = None
    """The launcher's short-lived parent, which exits as soon as the launcher detaches."""
    after: str | None = None
    """The key of the attempt this one was handed to the supervisor to follow: until that one
    ends, this one holds nothing of its own (it asks no more than its predecessor, and runs
    only after it)."""
    sent: bool = True
    """Whether the supervisor was told to start it (after its predecessor, if any)."""
    keeper: bool = False
    """Started (or handed ahead) through the supervisor connected now, which sees it end."""
    devices: tuple[int, ...] = ()
    """The GPU indices of its lease (``CUDA_VISIBLE_DEVICES``): no other attempt starts on
    them while it holds them, even when the core has already given them to the next run
    (a cancel it sent is still stopping this one)."""


class Capacity(Struct, frozen=True, kw_only=True):
    """The machine's share this driver may fill."""

    cpus: float
    memory: int
    gpus: int

    def within(self, held: Started, req: LocalRequest) -> bool:
        """May ``req`` follow ``held`` in its place (asking no more of any resource)?"""
        return (
            req.cpus <= held.cpus
            and req.memory <= held.memory
            and req.gpus * req.gpu_milli <= held.gpus * held.gpu_milli
            and set(req.devices or ()) <= set(held.devices)
        )

    def fits(self, held: Iterable[Started], req: LocalRequest) -> bool:
        """Does ``req`` fit beside what ``held`` holds? A leased device takes shares until
        they fill it; a run that holds it whole waits for every other run on it to end."""
        held = list(held)
        for d in req.devices or ():
            if sum(h.gpu_milli for h in held if d in h.devices) + req.gpu_milli > MILLI:
                return False  # a leased device is still in use: it waits for that attempt's end
        cpus = sum(h.cpus for h in held) + req.cpus
        memory = sum(h.memory for h in held) + req.memory
        gpus = sum(h.gpus * h.gpu_milli for h in held) + req.gpus * req.gpu_milli
        return cpus <= self.cpus + 1e-9 and memory <= self.memory and gpus <= self.gpus * MILLI


def gpu_model(info: GpuInfo) -> str:
    """The model name a GPU goes by in pools and specs: ``NVIDIA H200`` -> ``h200``."""
    name = info.name.lower().removeprefix("nvidia").strip()
    name = re.sub(r"[^a-z0-9.]+", "-", name).strip("-")
    return name or "unknown"


def local_devices(
    gpus: int, found: Sequence[GpuInfo], *, node: str, model: str | None = None
) -> PoolDevices | None:
    """This machine's GPUs by device, for ``Pool.devices`` (None without GPUs).

    ``gpus``: how many the configuration lets stowplan use; ``found``: what NVML or
    ``nvidia-smi`` reported (``provenance.nvidia.capture_gpus``), whose first ``gpus`` by the
    driver's index are used. Where nothing was found (no driver, a test machine), the
    configured count is trusted: devices ``0 .. gpus-1``. ``model``: the name the pool counts
    them under (its ``gpus`` key); by default that of the first device found, else
    ``unknown``. CPUs and memory are counted for the whole machine, not here.

    NOTE: a device's index in the lease is the driver's enumeration index, which is what
    ``CUDA_VISIBLE_DEVICES`` means under the default ``CUDA_DEVICE_ORDER`` (PCI bus order,
    as ``nvidia-smi`` numbers them).
    """
    if gpus <= 0:
        return None
    ordered = sorted(found, key=lambda g: g.index)[:gpus]
    if model is None:
        model = gpu_model(ordered[0]) if ordered else "unknown"
    width = max([g.index for g in ordered] + [gpus - 1]) + 1
    usable = {g.index for g in ordered} if ordered else set(range(gpus))
    devices = tuple(MILLI if d in usable else 0 for d in range(width))
    # this machine's processes may share a device (as Ray's fractional GPUs do): a share of one
    # GPU goes beside others on one device; whole-GPU runs still hold theirs alone
    return PoolDevices(nodes=(NodeDevices(name=node, model=model, devices=devices),), sharing=True)
