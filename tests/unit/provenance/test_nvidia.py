"""GPU capture: the parsers on real captures, the fallbacks on this machine as it is.

The ``nvidia-smi`` tests run real executables (small shell scripts standing in for the tool)
through the real subprocess path; NVML is never faked: where this machine has no driver, the
tests check that its absence is reported as such.
"""

from __future__ import annotations

import ctypes.util
import json
import re
import shutil
import stat
import time
from pathlib import Path

import msgspec
import pytest

from stowplan.provenance.nvidia import (
    QUERY_GPU_FIELDS,
    GpuInfo,
    capture_gpus,
    merge_views,
    nvidia_smi_gpus,
    nvml_gpus,
    parse_nvidia_smi_query_csv,
    parse_nvidia_smi_xml,
)

H200 = Path(__file__).parents[2] / "fixtures" / "hosts" / "h200-x1"
DEVICE = Path(__file__).parents[2] / "fixtures" / "hosts" / "h200-device-20261204"
XML = (H200 / "nvidia-smi-q-x.xml").read_text()
CSV = (H200 / "nvidia-smi-query-gpu.csv").read_text()

EXPECTED = GpuInfo(
    index=0,
    uuid="GPU-67fbe9c8-5eba-d7ab-c33d-266640000ac1",
    name="NVIDIA H200",
    driver_version="580.159.04",
    cuda_version="13.0",
    memory_total_bytes=143771 * 2**20,
    compute_capability=None,  # `nvidia-smi -q -x` does not report it
    pci_bus_id="00000000:00:06.0",
    serial="1654024030159",
    vbios="96.00.A5.00.1A",
)


def _common(g: GpuInfo) -> dict[str, object]:
    """The fields both nvidia-smi formats report."""
    d = msgspec.structs.asdict(g)
    del d["cuda_version"], d["compute_capability"]
    return d


# -- parsers ---------------------------------------------------------------------------------


def test_xml_h200() -> None:
    assert parse_nvidia_smi_xml(XML) == [EXPECTED]


def test_csv_h200() -> None:
    (gpu,) = parse_nvidia_smi_query_csv(CSV)
    assert gpu.compute_capability == "9.0"
    assert gpu.cuda_version is None
    assert _common(gpu) == _common(EXPECTED)


def test_xml_csv_and_list_agree() -> None:
    (from_xml,) = parse_nvidia_smi_xml(XML)
    (from_csv,) = parse_nvidia_smi_query_csv(CSV)
    assert _common(from_xml) == _common(from_csv)
    listed = re.fullmatch(
        r"GPU (\d+): (.+) \(UUID: (\S+)\)", (H200 / "nvidia-smi-L.txt").read_text().strip()
    )
    assert listed is not None
    assert (int(listed[1]), listed[2], listed[3]) == (from_xml.index, from_xml.name, from_xml.uuid)


def test_csv_without_units_in_values() -> None:
    nounits = CSV.replace(" MiB", "")
    assert "[MiB]" in nounits.splitlines()[0]
    assert parse_nvidia_smi_query_csv(nounits) == parse_nvidia_smi_query_csv(CSV)


def test_csv_needs_its_columns() -> None:
    header, row = CSV.splitlines()
    cut = ", ".join(header.split(", ")[:3]) + "\n" + ", ".join(row.split(", ")[:3])
    with pytest.raises(ValueError, match=r"memory\.total"):
        parse_nvidia_smi_query_csv(cut)
    with pytest.raises(ValueError, match="fields"):
        parse_nvidia_smi_query_csv(header + "\n" + row + ", extra")
    assert parse_nvidia_smi_query_csv("") == []
    assert parse_nvidia_smi_query_csv(header + "\n") == []


def test_xml_several_gpus_and_missing_values() -> None:
    start, end = XML.index("\t<gpu id="), XML.index("</gpu>") + len("</gpu>")
    gpu = XML[start:end]
    second = (
        gpu.replace(EXPECTED.uuid, "GPU-00000000-0000-0000-0000-000000000001")
        .replace("<serial>1654024030159</serial>", "<serial>N/A</serial>")
        .replace(
            "<pci_bus_id>00000000:00:06.0</pci_bus_id>", "<pci_bus_id>00000000:00:07.0</pci_bus_id>"
        )
    )
    two = XML[:end] + "\n" + second + XML[end:]
    first, other = parse_nvidia_smi_xml(two)
    assert first == EXPECTED
    assert other.index == 1
    assert other.uuid.endswith("0001")
    assert other.serial is None
    assert other.pci_bus_id == "00000000:00:07.0"


def test_xml_rejects_what_is_not_a_report() -> None:
    with pytest.raises(ValueError, match="parse"):
        parse_nvidia_smi_xml("NVIDIA-SMI has failed because it couldn't communicate")
    with pytest.raises(ValueError, match="root"):
        parse_nvidia_smi_xml("<html/>")
    with pytest.raises(ValueError, match="uuid"):
        parse_nvidia_smi_xml(re.sub(r"<uuid>.*</uuid>", "", XML))
    no_gpus = XML[: XML.index("\t<gpu id=")] + "</nvidia_smi_log>\n"
    assert parse_nvidia_smi_xml(no_gpus) == []


# -- nvidia-smi through a real subprocess ------------------------------------------------------


def _tool(directory: Path, body: str) -> Path:
    """An executable called nvidia-smi in ``directory``, a shell script with ``body``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _which(name: str) -> str:
    found = shutil.which(name)
    assert found is not None, f"{name} is needed by this test"
    return found


def _smi(directory: Path, host: Path) -> Path:
    """A stand-in that answers the two calls the fallback makes, with ``host``'s captures, and
    insists on the arguments the real tool needs for them."""
    cat = _which("cat")
    query = f"--query-gpu={','.join(QUERY_GPU_FIELDS)}"
    return _tool(
        directory,
        f'if [ "$1 $2" = "-q -x" ]; then exec {cat} "{host / "nvidia-smi-q-x.xml"}"; fi\n'
        f'if [ "$1 $2" = "{query} --format=csv" ]; then '
        f'exec {cat} "{host / "nvidia-smi-query-gpu.csv"}"; fi\nexit 3',
    )


def test_nvidia_smi_output_is_parsed(tmp_path: Path) -> None:
    full = msgspec.structs.replace(EXPECTED, compute_capability="9.0")
    assert nvidia_smi_gpus(str(_smi(tmp_path / "a", H200))) == [full]
    # a tool whose query fails still gives what -q -x says
    xml_only = _tool(
        tmp_path / "b",
        f'[ "$1 $2" = "-q -x" ] || exit 3\nexec {_which("cat")} "{H200 / "nvidia-smi-q-x.xml"}"',
    )
    assert nvidia_smi_gpus(str(xml_only)) == [EXPECTED]


def test_the_nvidia_smi_fallback_records_what_nvml_recorded_on_a_real_h200(
    tmp_path: Path,
) -> None:
    """Captured on the same card: NVML's answer, and what the two nvidia-smi views give."""
    nvml = msgspec.convert(json.loads((DEVICE / "nvml.json").read_text())["nvml"], list[GpuInfo])
    assert nvml and nvml[0].compute_capability == "9.0" and nvml[0].cuda_version == "13.0"
    xml = parse_nvidia_smi_xml((DEVICE / "nvidia-smi-q-x.xml").read_text())
    query = parse_nvidia_smi_query_csv((DEVICE / "nvidia-smi-query-gpu.csv").read_text())
    assert xml != nvml and query != nvml  # neither view alone is the whole record
    assert merge_views(xml, query) == nvml
    assert nvidia_smi_gpus(str(_smi(tmp_path, DEVICE))) == nvml


def test_nvidia_smi_failures_mean_no_answer(tmp_path: Path) -> None:
    no_driver = _tool(
        tmp_path / "a",
        'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\n'
        "exit 9",
    )
    assert nvidia_smi_gpus(str(no_driver)) is None
    garbage = _tool(tmp_path / "b", "echo '<nvidia_smi_log><driver_version>'")
    assert nvidia_smi_gpus(str(garbage)) is None
    assert nvidia_smi_gpus(str(tmp_path / "absent" / "nvidia-smi")) is None
    assert nvidia_smi_gpus("stowplan-no-such-tool") is None


def test_nvidia_smi_that_hangs_is_abandoned(tmp_path: Path) -> None:
    hung = _tool(tmp_path, f"exec {_which('sleep')} 30")
    began = time.monotonic()
    assert nvidia_smi_gpus(str(hung), timeout=0.5) is None
    assert time.monotonic() - began < 10


# -- NVML and the fallback order, on this machine --------------------------------------------


def test_nvml_answers_only_with_a_driver() -> None:
    gpus = nvml_gpus()
    if ctypes.util.find_library("nvidia-ml") is None:
        assert gpus is None
        return
    # A machine with the library: both sources must describe the same cards, or neither
    # answers (a library without a loaded driver).
    smi = nvidia_smi_gpus()
    if gpus is None:
        assert not smi
    elif smi is not None:
        assert [_common(g) for g in gpus] == [_common(g) for g in smi]
        assert [g.cuda_version for g in gpus] == [g.cuda_version for g in smi]


def test_capture_falls_back_to_nvidia_smi_then_to_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = nvml_gpus()
    bin_dir = tmp_path / "bin"
    _smi(bin_dir, H200)
    monkeypatch.setenv("PATH", str(bin_dir))
    with_tool = capture_gpus()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    without_tool = capture_gpus()
    if nvml is None:
        assert with_tool == [msgspec.structs.replace(EXPECTED, compute_capability="9.0")]
        assert without_tool == []
    else:  # NVML wins whenever it answers
        assert with_tool == without_tool == nvml


def test_gpu_info_round_trips_as_builtins() -> None:
    data = msgspec.to_builtins(EXPECTED)
    assert data["memory_total_bytes"] == 150_754_820_096
    assert msgspec.convert(data, GpuInfo) == EXPECTED
