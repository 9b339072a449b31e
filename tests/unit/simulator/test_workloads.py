from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.errors import SpecError
from stowplan.simulator.workloads import (
    SHIPPED as SHIPPED_COPIES,
)
from stowplan.simulator.workloads import (
    SyntheticSpec,
    WorkloadKind,
    assign_datasets,
    detect,
    load_philly,
    load_tiresias,
    load_workload,
    synthetic_sweep,
    trace_path,
)

from .conftest import CLUSTERS, ROOT, SHIPPED

GAVEL_861 = SHIPPED / "gavel" / "103959.trace"


def test_gavel_trace_drops_job_types_missing_from_the_table() -> None:
    wl = load_workload(GAVEL_861)
    assert wl.kind == "gavel"
    assert len(wl.jobs) == 861
    assert "dropped 125 jobs" in wl.notes[0]
    assert wl.throughput is not None
    j = wl.jobs[0]
    v100 = wl.throughput.rate(j.job_type, j.gpus, "v100")
    k80 = wl.throughput.rate(j.job_type, j.gpus, "k80")
    assert v100 and k80 is not None and v100 > k80


def test_philly_list_has_every_job(traces: Path) -> None:
    path = traces / "philly-derived-pollux/philly.csv"
    assert detect(path) is WorkloadKind.PHILLY
    wl = load_philly(path)
    assert len(wl.jobs) == 82_247
    assert wl.jobs[0].submit == 0.0
    assert all(a.submit <= b.submit for a, b in zip(wl.jobs, wl.jobs[1:], strict=False))
    assert len({j.project for j in wl.jobs}) == 15
    assert sum(1 for j in wl.jobs if j.gpus == 1) == 76_627


def test_shipped_tiresias_trace_loads() -> None:
    t = load_tiresias(SHIPPED / "tiresias" / "60_job.csv")
    assert len(t.jobs) == 60 and sorted({j.gpus for j in t.jobs}) == [1, 2, 4, 8]


def test_shipped_traces_are_byte_copies_of_the_shared_ones(traces: Path) -> None:
    for shared, shipped in SHIPPED_COPIES.items():
        assert (ROOT / shipped).read_bytes() == (traces / shared).read_bytes(), shipped
    for folder in ("tiresias", "gavel", "helios"):
        assert (SHIPPED / folder / "LICENSE").is_file() and (
            SHIPPED / folder / "README.md"
        ).is_file()
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size < 1 << 20, f"examples/traces/ holds {size:,} bytes: keep large traces outside"


def test_a_missing_trace_names_the_shipped_copy_or_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_workload(tmp_path / "shared" / "traces" / "tiresias-sim" / "60_job.csv")
    assert "file not found" in info.value.message
    assert info.value.hint == "a copy ships with stowplan: examples/traces/tiresias/60_job.csv"
    with pytest.raises(SpecError) as info:
        load_workload(tmp_path / "philly-derived-pollux" / "philly.csv")
    hint = info.value.hint or ""
    assert "github.com/petuum/adaptdl" in hint and "$STOWPLAN_TRACES/philly-derived-pollux/" in hint


def test_trace_path_reads_stowplan_traces_and_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STOWPLAN_TRACES", raising=False)
    # shipped traces need no environment
    assert trace_path("tiresias-sim/60_job.csv") == SHIPPED / "tiresias" / "60_job.csv"
    with pytest.raises(SpecError) as info:
        trace_path("philly-derived-pollux/philly.csv")
    e = info.value
    assert e.path == "STOWPLAN_TRACES" and "not shipped" in e.message
    assert "github.com/petuum/adaptdl" in (e.hint or "")
    monkeypatch.setenv("STOWPLAN_TRACES", str(tmp_path))
    with pytest.raises(SpecError) as info:
        trace_path("alibaba-gpu-v2023-openb/csv/openb_pod_list_default.csv")
    e = info.value
    assert e.file == str(tmp_path / "alibaba-gpu-v2023-openb/csv/openb_pod_list_default.csv")
    assert "alibaba/clusterdata" in (e.hint or "") and "research or study use" in (e.hint or "")
    f = tmp_path / "philly-derived-pollux" / "philly.csv"
    f.parent.mkdir()
    f.write_text("timestamp,duration,num_gpus,gpu_time,cluster\n")
    assert trace_path("philly-derived-pollux/philly.csv") == f


def test_a_cluster_or_experiment_file_given_as_workload_says_what_it_is() -> None:
    with pytest.raises(SpecError) as info:
        load_workload(CLUSTERS / "university-slurm.toml")
    assert info.value.message == "this is a cluster file, not a workload"
    assert "stowplan sim CLUSTER WORKLOAD" in (info.value.hint or "")
    with pytest.raises(SpecError) as info:
        load_workload(ROOT / "examples" / "quickstart.toml")
    assert "experiment file" in info.value.message
    assert "quickstart" not in (info.value.hint or "")


def test_openb_and_dlrm_load(traces: Path) -> None:
    o = load_workload(traces / "alibaba-gpu-v2023-openb/csv/openb_pod_list_default.csv")
    assert len(o.jobs) == 8152
    assert "fraction of a GPU" in o.notes[0]
    spec = load_workload(traces / "alibaba-gpu-v2023-openb/csv/openb_pod_list_gpuspec33.csv")
    assert ("v100m16", "v100m32") in {j.gpu_types for j in spec.jobs}
    d = load_workload(traces / "alibaba-gpu-v2025-dlrm/disaggregated_DLRM_trace.csv")
    assert len(d.jobs) == 23_871
    assert any(j.duration is None for j in d.jobs)  # services that never finish
    assert any(j.max_per_node for j in d.jobs)


def test_malformed_csv_names_file_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "philly.csv"
    f.write_text(
        "timestamp,duration,num_gpus,gpu_time,cluster\n"
        "2017-10-09 07:01:55,66.0,1,66.0,vc1\n"
        "2017-10-09 07:02:55,sixty,1,66.0,vc1\n"
    )
    with pytest.raises(SpecError) as info:
        load_workload(f)
    e = info.value
    assert e.line == 3 and e.path == "column 'duration'" and "not a number" in e.message
    f.write_text("timestamp,duration,num_gpus,gpu_time,cluster\n2017-13-09 07:01:55,1,1,1,v\n")
    with pytest.raises(SpecError, match="not a time") as info:
        load_workload(f)
    assert info.value.line == 2


def test_malformed_gavel_trace_names_the_line(tmp_path: Path) -> None:
    d = tmp_path / "gavel"
    d.mkdir()
    (d / "derived_isolated_throughputs_simulation.csv").write_text(
        (SHIPPED / "gavel/derived_isolated_throughputs_simulation.csv").read_text()
    )
    f = d / "x.trace"
    f.write_text("A3C\tcmd\t-n\t0\t1000\t0.0\t1\nA3C\tcmd\t-n\t0\t1000\tsoon\t1\n")
    with pytest.raises(SpecError) as info:
        load_workload(f)
    assert info.value.line == 2 and info.value.path == "column 'arrival_time'"


def test_unknown_trace_is_refused_with_a_hint(tmp_path: Path) -> None:
    f = tmp_path / "x.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(SpecError, match="cannot tell"):
        load_workload(f)


def test_synthetic_sweep_is_seeded() -> None:
    a = synthetic_sweep(SyntheticSpec(trials=50, seed=3))
    b = synthetic_sweep(SyntheticSpec(trials=50, seed=3))
    c = synthetic_sweep(SyntheticSpec(trials=50, seed=4))
    assert [(j.submit, j.duration) for j in a.jobs] == [(j.submit, j.duration) for j in b.jobs]
    assert [j.submit for j in a.jobs] != [j.submit for j in c.jobs]
    assert all(x.submit < y.submit for x, y in zip(a.jobs, a.jobs[1:], strict=False))


def test_dataset_assignment_is_explicit_seeded_and_recorded() -> None:
    a = synthetic_sweep(SyntheticSpec(trials=200, seed=1))
    b = synthetic_sweep(SyntheticSpec(trials=200, seed=1))
    assign_datasets(a, ["x", "y", "z"], seed=9)
    assign_datasets(b, ["z", "y", "x"], seed=9)
    assert [j.datasets for j in a.jobs] == [j.datasets for j in b.jobs]
    assert {j.datasets[0] for j in a.jobs} == {"x", "y", "z"}
    assert a.data_placement["seed"] == 9 and a.data_placement["datasets"] == ["x", "y", "z"]


def test_example_workload_file_loads() -> None:
    wl = load_workload(CLUSTERS / "sweep-workload.toml")
    assert len(wl.jobs) == 2000 and wl.jobs[0].datasets == ("imagenet",)
    assert wl.data_placement["seed"] == 5
