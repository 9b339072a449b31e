"""What NVIDIA GPUs this machine has, from NVML or from ``nvidia-smi``.

:func:`capture_gpus` asks NVML first (the ``pynvml`` module of ``nvidia-ml-py``, imported only
when called), falls back to ``nvidia-smi -q -x``, and returns ``[]`` when neither answers: a
machine without GPUs, driver or tool is normal, never an error. The parsers are pure functions
over the tool's captured output, tested on real captures in ``tests/fixtures/hosts``.

Both paths report the same :class:`GpuInfo` for the same card, so hardware records compare
equal however they were captured: memory is counted in whole MiB (what ``nvidia-smi`` prints),
and the CUDA version is the driver's (``13.0``), not a toolkit's.

NOTE: MIG instances are not listed; a MIG-enabled card appears once, as its physical GPU.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import shutil
import subprocess
import xml.etree.ElementTree as ET
from typing import Any, Final

import msgspec
from msgspec import Struct

__all__ = [
    "QUERY_GPU_FIELDS",
    "GpuInfo",
    "capture_gpus",
    "nvidia_smi_gpus",
    "nvml_gpus",
    "parse_nvidia_smi_query_csv",
    "parse_nvidia_smi_xml",
]

log = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT: Final = 10.0
"""Seconds ``nvidia-smi`` may take; a wedged driver can make it hang far longer."""

QUERY_GPU_FIELDS: Final = (
    "index",
    "uuid",
    "name",
    "driver_version",
    "memory.total",
    "compute_cap",
    "pci.bus_id",
    "serial",
    "vbios_version",
)
"""What to pass as ``nvidia-smi --query-gpu=...`` (comma-joined, with ``--format=csv``) for
:func:`parse_nvidia_smi_query_csv`; ``compute_cap`` needs driver 510 or newer."""

_MIB: Final = 1 << 20
_UNITS: Final = {"B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
_MISSING: Final = frozenset({"", "N/A", "[N/A]", "NOT SUPPORTED", "[NOT SUPPORTED]"})


class GpuInfo(Struct, frozen=True, kw_only=True):
    """One physical GPU as the driver describes it."""

    index: int
    """the driver's enumeration index (``nvidia-smi -i``), PCI bus order by default."""
    uuid: str
    name: str
    driver_version: str
    cuda_version: str | None
    """highest CUDA version the driver supports; None when the source does not say."""
    memory_total_bytes: int
    """framebuffer size, a whole number of MiB."""
    compute_capability: str | None = None
    """``major.minor``; ``nvidia-smi -q -x`` does not report it (``--query-gpu`` does)."""
    pci_bus_id: str | None = None
    serial: str | None = None
    vbios: str | None = None


def _value(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return None if text.upper() in _MISSING else text


def _bytes(text: str, default_unit: str = "B") -> int:
    """``"143771 MiB"`` (or ``"143771"`` with the unit given apart) as a number of bytes."""
    parts = text.split()
    if len(parts) == 1:
        number, unit = parts[0], default_unit
    elif len(parts) == 2:
        number, unit = parts
    else:
        raise ValueError(f"not a memory size: {text!r}")
    factor = _UNITS.get(unit.upper())
    if factor is None:
        raise ValueError(f"unknown memory unit in {text!r}")
    return int(number) * factor


def _required(value: str | None, what: str) -> str:
    if value is None:
        raise ValueError(f"nvidia-smi output has no {what}")
    return value


def parse_nvidia_smi_xml(text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi -q -x``: one :class:`GpuInfo` per ``<gpu>``, in document order.

    Raises ``ValueError`` for text that is not that tool's XML report.
    """
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"nvidia-smi XML does not parse: {e}") from None
    if root.tag != "nvidia_smi_log":
        raise ValueError(f"not an nvidia-smi XML report (root element <{root.tag}>)")
    driver = _required(_value(root.findtext("driver_version")), "driver_version")
    cuda = _value(root.findtext("cuda_version"))
    gpus: list[GpuInfo] = []
    for index, gpu in enumerate(root.findall("gpu")):
        memory = _required(_value(gpu.findtext("fb_memory_usage/total")), "memory total")
        cc = _value(gpu.findtext("compute_cap"))
        gpus.append(
            GpuInfo(
                index=index,
                uuid=_required(_value(gpu.findtext("uuid")), "uuid"),
                name=_required(_value(gpu.findtext("product_name")), "product_name"),
                driver_version=driver,
                cuda_version=cuda,
                memory_total_bytes=_bytes(memory),
                compute_capability=cc,
                pci_bus_id=_value(gpu.findtext("pci/pci_bus_id")) or _value(gpu.get("id")),
                serial=_value(gpu.findtext("serial")),
                vbios=_value(gpu.findtext("vbios_version")),
            )
        )
    return gpus


def parse_nvidia_smi_query_csv(text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=<QUERY_GPU_FIELDS> --format=csv`` (header required).

    Units may be in the values (``143771 MiB``) or, with ``nounits``, only in the header
    (``memory.total [MiB]``). The query format has no CUDA version: ``cuda_version`` is None.
    Raises ``ValueError`` when a required column is missing or a value does not parse.
    """
    rows = list(csv.reader(io.StringIO(text.strip()), skipinitialspace=True))
    if not rows:
        return []
    header: list[str] = []
    units: list[str] = []
    for column in rows[0]:
        name, _, unit = column.strip().partition(" [")
        header.append(name.strip())
        units.append(unit.rstrip("]").strip() or "B")
    missing = {"index", "uuid", "name", "driver_version", "memory.total"} - set(header)
    if missing:
        raise ValueError(f"nvidia-smi CSV lacks column(s): {', '.join(sorted(missing))}")
    gpus: list[GpuInfo] = []
    for row in rows[1:]:
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(f"nvidia-smi CSV row has {len(row)} fields, header {len(header)}")
        cells = {h: _value(v) for h, v in zip(header, row, strict=True)}
        memory_unit = units[header.index("memory.total")]
        gpus.append(
            GpuInfo(
                index=int(_required(cells["index"], "index")),
                uuid=_required(cells["uuid"], "uuid"),
                name=_required(cells["name"], "name"),
                driver_version=_required(cells["driver_version"], "driver_version"),
                cuda_version=None,
                memory_total_bytes=_bytes(
                    _required(cells["memory.total"], "memory.total"), memory_unit
                ),
                compute_capability=cells.get("compute_cap"),
                pci_bus_id=cells.get("pci.bus_id"),
                serial=cells.get("serial"),
                vbios=cells.get("vbios_version"),
            )
        )
    return gpus


def _text(value: Any) -> str:
    # pynvml returns str on Python 3 since 11.x, bytes before that.
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_gpus() -> list[GpuInfo] | None:
    """The GPUs NVML reports, or None when NVML is not usable here (no module, no driver).

    A GPU whose optional attributes (serial, VBIOS, ...) NVML does not support still counts;
    an NVML failure on a required attribute makes the whole answer None, so the caller falls
    back to ``nvidia-smi`` instead of recording half a machine.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as e:
        log.debug("NVML unavailable: %s", e)
        return None
    try:

        def optional(fn: Any, *args: Any) -> str | None:
            try:
                return _value(_text(fn(*args)))
            except pynvml.NVMLError:
                return None

        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        try:
            v = int(pynvml.nvmlSystemGetCudaDriverVersion_v2())
            cuda: str | None = f"{v // 1000}.{(v % 1000) // 10}"
        except pynvml.NVMLError:
            cuda = None
        gpus: list[GpuInfo] = []
        for index in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                cc: str | None = f"{int(major)}.{int(minor)}"
            except pynvml.NVMLError:
                cc = None
            try:
                bus: str | None = _value(_text(pynvml.nvmlDeviceGetPciInfo(handle).busId))
            except pynvml.NVMLError:
                bus = None
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    driver_version=driver,
                    cuda_version=cuda,
                    memory_total_bytes=total // _MIB * _MIB,
                    compute_capability=cc,
                    pci_bus_id=bus,
                    serial=optional(pynvml.nvmlDeviceGetSerial, handle),
                    vbios=optional(pynvml.nvmlDeviceGetVbiosVersion, handle),
                )
            )
        return gpus
    except pynvml.NVMLError as e:
        log.warning("NVML failed while listing GPUs, trying nvidia-smi: %s", e)
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def merge_views(xml: list[GpuInfo], query: list[GpuInfo]) -> list[GpuInfo]:
    """The ``-q -x`` view with what it lacks filled in from the ``--query-gpu`` view, GPU by
    GPU (matched by UUID).

    NOTE: ``nvidia-smi -q -x`` has no compute capability (seen on driver 580 with an H200)
    and the query format has no CUDA version, while NVML gives both: together the two
    ``nvidia-smi`` views record what NVML records, so a run's hardware does not depend on
    which source was usable.
    """
    by_uuid = {g.uuid: g for g in query}
    out: list[GpuInfo] = []
    for g in xml:
        q = by_uuid.get(g.uuid)
        if q is None:
            out.append(g)
            continue
        out.append(
            msgspec.structs.replace(
                g,
                cuda_version=g.cuda_version or q.cuda_version,
                compute_capability=g.compute_capability or q.compute_capability,
                pci_bus_id=g.pci_bus_id or q.pci_bus_id,
                serial=g.serial or q.serial,
                vbios=g.vbios or q.vbios,
            )
        )
    return out


def _run_nvidia_smi(path: str, args: list[str], timeout: float) -> str | None:
    """The output of ``nvidia-smi ARGS``, or None when it fails or hangs (logged)."""
    try:
        done = subprocess.run(
            [path, *args],
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        log.warning("%s %s took more than %s s", path, args[0], timeout)
        return None
    except OSError as e:
        log.warning("could not run %s: %s", path, e)
        return None
    if done.returncode != 0:
        message = done.stdout.decode(errors="replace").strip()[:200]
        log.debug("%s %s exited %d: %s", path, args[0], done.returncode, message)
        return None
    return done.stdout.decode(errors="replace")


def nvidia_smi_gpus(
    executable: str = "nvidia-smi", *, timeout: float = NVIDIA_SMI_TIMEOUT
) -> list[GpuInfo] | None:
    """The GPUs ``nvidia-smi -q -x`` reports, completed by ``--query-gpu`` (see
    :func:`merge_views`), or None when it is absent, fails or hangs.

    ``executable`` is looked up on PATH like a shell would. The tool exits non-zero when it
    cannot talk to a driver (a container without GPUs, say): that is None too, not an error.
    A failing query after a good ``-q -x`` only leaves the fields the XML lacks empty.
    """
    path = shutil.which(executable)
    if path is None:
        return None
    text = _run_nvidia_smi(path, ["-q", "-x"], timeout)
    if text is None:
        return None
    try:
        gpus = parse_nvidia_smi_xml(text)
    except ValueError as e:
        log.warning("could not read the output of %s -q -x: %s", path, e)
        return None
    query = _run_nvidia_smi(
        path, [f"--query-gpu={','.join(QUERY_GPU_FIELDS)}", "--format=csv"], timeout
    )
    if query is not None:
        try:
            gpus = merge_views(gpus, parse_nvidia_smi_query_csv(query))
        except ValueError as e:
            log.warning("could not read the output of %s --query-gpu: %s", path, e)
    return gpus


def capture_gpus() -> list[GpuInfo]:
    """This machine's GPUs: NVML, else ``nvidia-smi``, else none. Never raises for their absence."""
    gpus = nvml_gpus()
    if gpus is None:
        gpus = nvidia_smi_gpus()
    return gpus or []
