"""Saved discovery facts, and a dry run that writes nothing and works offline from them.

The Slurm driver here talks to an unreachable login node: a loopback port nothing listens on
(connection refused at once), or one that accepts and never answers (a black hole).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from stowplan.cli.control import discover, save_discovered
from stowplan.cli.main import main
from stowplan.errors import ProviderError, SpecError
from stowplan.placement.problem import Pool, Shape
from stowplan.providers.facts import facts_path, load_facts, save_facts
from stowplan.providers.registry import make_provider
from stowplan.providers.slurm import ssh as ssh_mod
from stowplan.spec.models import InstantProviderConfig, SlurmProviderConfig

POOLS = [
    Pool(
        id="campus/gpu",
        provider="campus",
        kind="slurm",
        site="spcluster",
        cpus=16.0,
        memory=16 << 30,
        gpus={"fake": 4},
        node=Shape(cpus=8, memory=8 << 30, gpus={"fake": 2}),
    )
]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never says a word (no SSH banner)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


@pytest.fixture
def refuse_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connect once instead of backing off for 7.5 s: the refusal is what is tested."""
    monkeypatch.setattr(ssh_mod, "BACKOFF_S", ())


def slurm(port: int, **extra: object) -> SlurmProviderConfig:
    return msgspec.convert(
        {"kind": "slurm", "host": "127.0.0.1", "port": port, **extra}, SlurmProviderConfig
    )


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a digest of its content."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = ""
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def prepared(state_dir: Path, **providers: object) -> SimpleNamespace:
    return SimpleNamespace(
        providers=providers,
        state_dir=str(state_dir),
        project=SimpleNamespace(file=str(state_dir.parent / "stowplan.toml")),
    )


# ---- the facts file ---------------------------------------------------------------------------


def test_facts_round_trip_atomically_and_only_for_the_same_configuration(tmp_path: Path) -> None:
    cfg = slurm(2222)
    path = save_facts(tmp_path, "campus", cfg, POOLS, now=1_800_000_000.0)
    assert path == tmp_path / "facts" / "campus.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["campus.json"]  # no temp file left
    record, why = load_facts(tmp_path, "campus", cfg)
    assert record is not None and why == ""
    assert record.pools == POOLS and record.discovered_at == 1_800_000_000.0
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", record.when())
    # another host, port or partition list is another cluster: its facts are not these
    other, why = load_facts(tmp_path, "campus", slurm(2223))
    assert other is None and "another configuration" in why
    none, why = load_facts(tmp_path, "elsewhere", cfg)
    assert none is None and "no facts saved" in why
    path.write_bytes(b'{"provider": "campus", "pools": [')  # torn by hand
    torn, why = load_facts(tmp_path, "campus", cfg)
    assert torn is None and "unreadable" in why


def test_a_failed_save_leaves_the_old_facts_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = slurm(2222)
    save_facts(tmp_path, "campus", cfg, POOLS, now=1.0)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("stowplan.providers.facts.os.replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        save_facts(tmp_path, "campus", cfg, [], now=2.0)
    record, _ = load_facts(tmp_path, "campus", cfg)
    assert record is not None and record.pools == POOLS
    assert sorted(p.name for p in facts_path(tmp_path, "campus").parent.iterdir()) == [
        "campus.json"
    ]


# ---- the driver writes nothing --------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.usefixtures("refuse_fast")
async def test_a_failed_discovery_writes_nothing_in_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / ".stowplan"
    state.mkdir()
    before = tree(state)
    async with make_provider("campus", slurm(closed_port()), state_dir=state) as drv:
        with pytest.raises(ProviderError, match="cannot connect"):
            await drv.discover()
    assert tree(state) == before  # it used to leave slurm/campus/stats-<pid>.json


# ---- discover: a real run saves, a dry run falls back -----------------------------------------


def test_discovery_writes_nothing_and_a_real_run_saves_every_providers_facts(
    tmp_path: Path,
) -> None:
    state = tmp_path / ".stowplan"
    cfg = InstantProviderConfig()
    prep = prepared(state, bench=cfg)
    pools = discover(prep)
    assert not state.exists()  # a run that then fails its feasibility check writes nothing
    save_discovered(prep, pools)
    record, _ = load_facts(state, "bench", cfg)
    assert record is not None and record.pools == pools and pools


@pytest.mark.usefixtures("refuse_fast")
def test_an_unreachable_cluster_dry_runs_from_saved_facts_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / ".stowplan"
    cfg = slurm(closed_port())
    save_facts(state, "campus", cfg, POOLS, now=1_800_000_000.0)
    before = tree(tmp_path)
    pools = discover(prepared(state, campus=cfg), dry_run=True)
    assert pools == POOLS
    err = capsys.readouterr().err
    when = load_facts(state, "campus", cfg)[0]
    assert when is not None
    assert re.search(
        rf"^campus: unreachable \(ssh 127\.0\.0\.1:\d+: cannot connect .*\); "
        rf"using facts discovered {when.when()}$",
        err,
        re.M,
    ), err
    assert tree(tmp_path) == before


def test_a_silent_cluster_is_given_up_on_within_the_bound(
    tmp_path: Path, black_hole: int, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / ".stowplan"
    cfg = slurm(black_hole)
    save_facts(state, "campus", cfg, POOLS)
    before = tree(tmp_path)
    assert discover(prepared(state, campus=cfg), dry_run=True, timeout_s=0.5) == POOLS
    assert "campus: unreachable (no answer within 0.5 s); using facts" in capsys.readouterr().err
    assert tree(tmp_path) == before


@pytest.mark.usefixtures("refuse_fast")
def test_an_unreachable_cluster_without_saved_facts_is_a_clear_error(tmp_path: Path) -> None:
    state = tmp_path / ".stowplan"
    before = tree(tmp_path)
    with pytest.raises(SpecError) as info:
        discover(prepared(state, campus=slurm(closed_port())), dry_run=True)
    e = info.value
    assert e.path == "$.providers.campus" and "unreachable" in e.message
    assert "no facts saved" in e.message and e.hint
    assert tree(tmp_path) == before


@pytest.mark.usefixtures("refuse_fast")
def test_run_dry_run_exits_2_or_plans_offline_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = closed_port()
    (tmp_path / "stowplan.toml").write_text(
        f'[project]\nname = "p"\n[providers.campus]\nkind = "slurm"\nhost = "127.0.0.1"\n'
        f'port = {port}\nworkdir = "/scratch/sp"\n'
    )
    (tmp_path / "exp.toml").write_text(
        '[experiment]\nname = "e"\n[[tasks]]\nname = "t"\ncommand = ["true"]\n'
        'resources = { cpus = 1, memory = "1GiB" }\n'
    )
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    assert main(["run", "exp.toml", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "provider 'campus' is unreachable" in err and "Traceback" not in err
    assert tree(tmp_path) == before

    # facts from an earlier real run: the dry run plans with them and says how old they are
    cfg = slurm(port, workdir="/scratch/sp")
    save_facts(tmp_path / ".stowplan", "campus", cfg, POOLS, now=1_800_000_000.0)
    before = tree(tmp_path)
    assert main(["run", "exp.toml", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "campus: unreachable (" in err and "using facts discovered" in err
    assert "#SBATCH" in out
    assert tree(tmp_path) == before
