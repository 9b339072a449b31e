"""GPU capture: NVML through nvidia-ml-py when a driver answers, else ``nvidia-smi -q -x``."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET

from msgspec import Struct

NVIDIA_SMI_TIMEOUT_S = 10


class GpuInfo(Struct, frozen=True, kw_only=True):
    index: int
    uuid: str
    name: str
    driver_version: str
    cuda_version: str | None = None
    memory_total_bytes: int | None = None
    compute_capability: str | None = None
    pci_bus_id: str | None = None
    serial: str | None = None
    vbios: str | None = None


def _mib(text: str | None) -> int | None:
    if not text:
        return None
    parts = text.split()
    try:
        value = float(parts[0])
    except (ValueError, IndexError):
        return None
    unit = parts[1] if len(parts) > 1 else "MiB"
    factor = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}.get(unit, 1024**2)
    return int(value * factor)


def parse_nvidia_smi_xml(text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi -q -x`` output."""
    root = ET.fromstring(text)
    driver = root.findtext("driver_version") or ""
    cuda = root.findtext("cuda_version")
    gpus = []
    for i, gpu in enumerate(root.findall("gpu")):
        cc = None
        major, minor = gpu.findtext("compute_cap"), None
        if major is None:
            major = gpu.findtext("cuda_compute_capability/major")
            minor = gpu.findtext("cuda_compute_capability/minor")
            cc = f"{major}.{minor}" if major and minor else None
        else:
            cc = major
        minor_idx = gpu.findtext("minor_number")
        gpus.append(
            GpuInfo(
                index=int(minor_idx) if minor_idx and minor_idx.isdigit() else i,
                uuid=gpu.findtext("uuid") or "",
                name=gpu.findtext("product_name") or "",
                driver_version=driver,
                cuda_version=cuda,
                memory_total_bytes=_mib(gpu.findtext("fb_memory_usage/total")),
                compute_capability=cc,
                pci_bus_id=gpu.get("id") or gpu.findtext("pci/pci_bus_id"),
                serial=gpu.findtext("serial"),
                vbios=gpu.findtext("vbios_version"),
            )
        )
    return gpus


def parse_nvidia_smi_query_csv(text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=index,uuid,name,driver_version,memory.total,compute_cap,
    pci.bus_id,serial,vbios_version --format=csv``."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    out = []
    for line in lines[1:]:
        f = [c.strip() for c in line.split(",")]
        if len(f) < 9:
            continue
        out.append(
            GpuInfo(
                index=int(f[0]),
                uuid=f[1],
                name=f[2],
                driver_version=f[3],
                memory_total_bytes=_mib(f[4]),
                compute_capability=f[5],
                pci_bus_id=f[6],
                serial=f[7],
                vbios=f[8],
            )
        )
    return out


def _from_nvml() -> list[GpuInfo] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda_raw = pynvml.nvmlSystemGetCudaDriverVersion()
        cuda = f"{cuda_raw // 1000}.{cuda_raw % 1000 // 10}"
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            out.append(
                GpuInfo(
                    index=i,
                    uuid=str(pynvml.nvmlDeviceGetUUID(h)),
                    name=str(pynvml.nvmlDeviceGetName(h)),
                    driver_version=str(driver),
                    cuda_version=cuda,
                    memory_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                    compute_capability=f"{major}.{minor}",
                    pci_bus_id=str(pynvml.nvmlDeviceGetPciInfo(h).busId),
                )
            )
        return out
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def capture_gpus() -> list[GpuInfo]:
    """The GPUs of this machine; [] when there are none or no driver answers."""
    gpus = _from_nvml()
    if gpus is not None:
        return gpus
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run(
            [smi, "-q", "-x"], capture_output=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0:
        return []
    try:
        return parse_nvidia_smi_xml(done.stdout.decode(errors="replace"))
    except ET.ParseError:
        return []
