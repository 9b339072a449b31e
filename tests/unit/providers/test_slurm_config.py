"""``[providers.X] kind = "slurm"`` in stowplan.toml: what loads, and what a user gets wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowplan.errors import SpecError
from stowplan.providers.base import Capability
from stowplan.providers.registry import make_provider
from stowplan.providers.slurm import SlurmProvider
from stowplan.spec.loader import load_project
from stowplan.spec.models import SlurmProviderConfig

BASE = '[project]\nname = "p"\n[providers.campus]\nkind = "slurm"\nhost = "login.example"\n'


def load(tmp_path: Path, extra: str) -> SlurmProviderConfig:
    f = tmp_path / "stowplan.toml"
    f.write_text(BASE + extra)
    cfg = load_project(f).config.providers["campus"]
    assert isinstance(cfg, SlurmProviderConfig)
    return cfg


def test_ssh_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    assert (cfg.port, cfg.transport, cfg.workdir, cfg.known_hosts) == (22, "ssh", "stowplan", None)
    driver = make_provider("campus", cfg, state_dir=tmp_path)
    assert isinstance(driver, SlurmProvider) and Capability.ARRAYS in driver.capabilities


def test_rest_is_selectable(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        'transport = "rest"\nrest_url = "http://slurm:6820"\nworkdir = "/scratch/sp"\n'
        'user = "alice"\n',
    )
    driver = make_provider("campus", cfg, state_dir=tmp_path)
    assert isinstance(driver, SlurmProvider)
    assert Capability.LOGS not in driver.capabilities
    assert "slurmrestd" in driver.capabilities.reason(Capability.LOGS)


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        ("port = 0\n", "$.providers.campus.port", "at least 1"),
        ('transport = "telnet"\n', "$.providers.campus.transport", "telnet"),
        ('transport = "rest"\n', "$.providers.campus", "rest_url"),
        ('transport = "rest"\nrest_url = "http://x"\n', "$.providers.campus", "absolute"),
        ('workdir = "../up"\n', "$.providers.campus", "without '..'"),
        ('remote_env = { "A-B" = "1" }\n', "$.providers.campus", "an identifier"),
        ("max_array_size = 0\n", "$.providers.campus.max_array_size", "at least 1"),
        ("hostname = 1\n", "$.providers.campus", "hostname"),
    ],
)
def test_mistakes_name_the_field(tmp_path: Path, extra: str, path: str, words: str) -> None:
    with pytest.raises(SpecError) as e:
        load(tmp_path, extra)
    text = e.value.render()
    assert "stowplan.toml" in text and words in text, text
    assert (e.value.path or "").startswith(path), e.value.path
