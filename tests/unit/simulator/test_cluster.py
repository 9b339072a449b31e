from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.errors import SpecError
from stowplan.simulator.cluster import PoolKind, load_cluster, parse_rate

from .conftest import CLUSTERS

GOOD = """\
[cluster]
name = "t"

[[sites]]
name = "a"

[[pools]]
name = "gpu"
site = "a"
kind = "slurm"
nodes = 2
gpus_per_node = 4
gpu_model = "a100"
memory_per_node = "64GiB"
"""


EXAMPLES = sorted(p for p in CLUSTERS.glob("*.toml") if not p.name.endswith("-workload.toml"))


def test_the_three_promised_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"university-slurm.toml", "k8s-gpu-pool.toml", "aws-region.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_cluster_loads(path: Path) -> None:
    spec = load_cluster(path).spec
    assert spec.pools and all(p.units > 0 for p in spec.pools)


def test_units_are_parsed(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(GOOD)
    spec = load_cluster(f).spec
    pool = spec.pools[0]
    assert pool.kind is PoolKind.SLURM
    assert pool.memory_bytes == 64 * 2**30
    assert parse_rate("10Gbps") == 10e9 / 8
    assert parse_rate("1GB/s") == 1e9


def _error(tmp_path: Path, text: str) -> SpecError:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(SpecError) as info:
        load_cluster(f)
    return info.value


def test_unknown_field_names_file_line_and_path(tmp_path: Path) -> None:
    e = _error(tmp_path, GOOD.replace('kind = "slurm"', 'kind = "slurm"\nnodez = 3'))
    assert e.file is not None and e.file.endswith("c.toml")
    assert e.path == "$.pools[0].nodez"
    assert e.line == 11
    assert e.hint


def test_bad_value_names_the_field(tmp_path: Path) -> None:
    e = _error(tmp_path, GOOD.replace('"64GiB"', '"64 gigs"'))
    assert e.path == "$.pools[0].memory_per_node"
    assert e.line == 14
    assert "not a size" in e.message


def test_unknown_site_is_caught_with_its_line(tmp_path: Path) -> None:
    e = _error(tmp_path, GOOD.replace('site = "a"', 'site = "b"'))
    assert e.path == "$.pools[0].site" and e.line == 9
    assert "unknown site" in e.message and "'a'" in (e.hint or "")


def test_cloud_pool_needs_max_instances(tmp_path: Path) -> None:
    e = _error(tmp_path, GOOD.replace('"slurm"', '"cloud"'))
    assert e.path == "$.pools[0].nodes"


def test_wrong_kind_lists_the_choices(tmp_path: Path) -> None:
    e = _error(tmp_path, GOOD.replace('"slurm"', '"pbs"'))
    assert e.path == "$.pools[0].kind" and e.line == 10


def test_broken_toml_gives_the_line(tmp_path: Path) -> None:
    e = _error(tmp_path, GOOD.replace("nodes = 2", "nodes = = 2"))
    assert e.line == 11


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        load_cluster(tmp_path / "nope.toml")


def test_real_node_lists_become_kubernetes_pools(traces: Path) -> None:
    openb = load_cluster(traces / "alibaba-gpu-v2023-openb/csv/openb_node_list_all_node.csv").spec
    assert sum(p.nodes for p in openb.pools) == 1523
    assert sum(p.nodes * p.gpus_per_node for p in openb.pools) == 6212
    assert all(p.kind is PoolKind.KUBERNETES for p in openb.pools)
    spot = load_cluster(traces / "alibaba-v2026-spot-gpu-nodes/node_info_df.csv").spec
    assert sum(p.nodes for p in spot.pools) == 4278
    by_model: dict[str, int] = {}
    for p in spot.pools:
        by_model[p.gpu_model or ""] = by_model.get(p.gpu_model or "", 0) + p.nodes * p.gpus_per_node
    assert by_model["a100-sxm4-80gb"] == 3456 and by_model["h800"] == 1752


def test_a_broken_node_list_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "nodes.csv"
    f.write_text("sn,cpu_milli,memory_mib,gpu,model\nn0,64000,262144,2,P100\nn1,lots,1,2,P100\n")
    with pytest.raises(SpecError) as info:
        load_cluster(f)
    assert info.value.line == 3


def test_cloud_pools_refuse_node_failures(tmp_path: Path) -> None:
    cloud = GOOD.replace('"slurm"', '"cloud"').replace("nodes = 2", "max_instances = 2")
    e = _error(tmp_path, cloud + 'failures = { mtbf = "1d" }\n')
    assert e.path == "$.pools[0].failures"
    assert "interruptions_per_hour" in e.message


def test_idle_grace_is_a_duration_and_defaults_to_two_minutes(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(GOOD)
    assert load_cluster(p).spec.scheduler.idle_grace_s == 120.0
    e = _error(tmp_path, GOOD + '[scheduler]\nidle_grace = "soon"\n')
    assert e.path == "$.scheduler.idle_grace" and "not a duration" in e.message
