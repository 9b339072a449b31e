"""A pool's GPUs by device, and the lease naming the node and devices one attempt holds.

Plain data, shared by discovery (which fills ``Pool.devices``), the scheduler core (which
places on the devices and hands out ``DeviceLease``) and the providers and simulator (which
start the attempt on exactly those devices). The placement itself is ``devices.DeviceModel``.
"""

from __future__ import annotations

from msgspec import Struct

MILLI = 1000
"""Milli-capacity of one whole GPU device (``devices.MILLI``)."""


class NodeDevices(Struct, frozen=True, kw_only=True):
    """One node of a pool: its GPU model and, per device index, the milli-capacity stowplan
    may use there (``MILLI``: the whole device). ``cpus``/``memory``: what stowplan may use of
    the node, when the pool counts them per node (0: counted only for the whole pool)."""

    name: str
    model: str = ""
    devices: tuple[int, ...] = ()
    cpus: float = 0.0
    memory: int = 0


class PoolDevices(Struct, frozen=True, kw_only=True):
    """A pool whose GPUs are known by device: placing there means choosing a node and device
    indices (the lease is the placement). ``sharing``: the provider can put fractional shares
    of one device on it (the local provider, Kubernetes time-slicing); otherwise a task holds
    whole devices. ``slices``: a sharing pool hands out each device in this many equal slices
    (Kubernetes time-slicing's replicas), so a share holds a whole number of them
    (``slice_milli``); 0: any thousandths."""

    nodes: tuple[NodeDevices, ...]
    sharing: bool = False
    slices: int = 0

    def share_slices(self, milli: int) -> int:
        """How many of a device's ``slices`` a share of ``milli`` holds: rounded up, and all
        of them once it needs them all (0 where the pool has no slices)."""
        if not self.slices:
            return 0
        return min(self.slices, -(-min(milli, MILLI) * self.slices // MILLI))

    def slice_milli(self, milli: int) -> int:
        """The thousandths of one device a share of ``milli`` holds here: rounded up to whole
        slices (``MILLI`` once it needs them all)."""
        k = self.share_slices(milli)
        if not k:
            return min(milli, MILLI)
        return MILLI if k >= self.slices else k * (MILLI // self.slices)


class DeviceLease(Struct, frozen=True, array_like=True):
    """Where one attempt runs: the node's name and the device indices it holds there
    (``CUDA_VISIBLE_DEVICES`` on the local provider); empty for a CPU-only attempt. A gang
    (``resources.nodes``) holds a part on each of several nodes: the first is ``node`` and
    ``devices``, the others ``others`` in the order they were placed. A one-node lease
    stored before ``others`` existed (``[node, devices]``) still reads."""

    node: str
    devices: tuple[int, ...] = ()
    others: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def parts(self) -> list[tuple[str, tuple[int, ...]]]:
        """Each node of the lease with its device indices, the first first."""
        return [(self.node, self.devices), *self.others]

    def visible(self) -> str:
        """The value of ``CUDA_VISIBLE_DEVICES`` for this lease ("" hides every GPU)."""
        return ",".join(str(d) for d in self.devices)


GANG_SEP = ";"
"""Between a gang's nodes in the store's ``attempts.node`` and ``devices`` columns: no node
name has it (Kubernetes names are DNS labels; Slurm's and the simulator's never hold one)."""


def devices_text(devices: tuple[int, ...] | None) -> str | None:
    """Device indices as the store keeps them: "0,1", "" for none, None for not known."""
    return None if devices is None else ",".join(str(d) for d in devices)


def devices_of(text: str | None) -> tuple[int, ...] | None:
    """The device indices of a ``devices_text`` (None: not recorded, or unreadable)."""
    if text is None:
        return None
    try:
        return tuple(int(d) for d in text.split(",")) if text else ()
    except ValueError:
        return None


def lease_columns(lease: DeviceLease) -> tuple[str | None, str]:
    """``(node, devices)`` as the store's attempts row keeps ``lease``: ``("n1", "0,1")``; a
    gang's nodes and device lists joined by ``GANG_SEP`` (``("n1;n2", "0,1;0,1")``); no node
    (None) for a lease that names none."""
    parts = lease.parts()
    node = GANG_SEP.join(n for n, _ in parts)
    devices = GANG_SEP.join(",".join(str(d) for d in devs) for _, devs in parts)
    return node or None, devices


def lease_from_columns(node: str | None, devices: str | None) -> DeviceLease | None:
    """The lease an attempts row keeps (``lease_columns``); None where it was not recorded or
    cannot be read (as for a row older than the columns)."""
    if node is None or devices is None:
        return None
    names = node.split(GANG_SEP)
    lists = [devices_of(text) for text in devices.split(GANG_SEP)]
    if len(names) != len(lists):
        return None
    parts = []
    for name, devs in zip(names, lists, strict=True):
        if devs is None:
            return None
        parts.append((name, devs))
    (first, devs), *others = parts
    return DeviceLease(first, devs, tuple(others))
