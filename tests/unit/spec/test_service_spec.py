"""``[tasks.service]``: the spec of a long-running service task, and the SpecErrors (file,
``$.path``, line, fix; CLI exit 2, nothing written) for what cannot work."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from stowplan.cli import main as cli_main
from stowplan.errors import SpecError
from stowplan.spec.canonical import canonical_task, task_hash
from stowplan.spec.loader import load_experiment, load_project
from stowplan.spec.models import ServiceSpec

HEAD = '[experiment]\nname = "e"\n\n'


def load(tmp_path: Path, body: str) -> object:
    (tmp_path / "stowplan.toml").write_text('[project]\nname = "p"\n')
    path = tmp_path / "exp.toml"
    path.write_text(HEAD + textwrap.dedent(body))
    return load_experiment(path, load_project(tmp_path / "stowplan.toml"))


def error(tmp_path: Path, body: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        load(tmp_path, body)
    return info.value


def test_service_true_is_the_defaults(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        """
        [[tasks]]
        name = "tb"
        command = ["tensorboard", "--logdir", "runs"]
        service = true

        [[tasks]]
        name = "nb"
        command = ["jupyter", "lab"]
        [tasks.service]
        port = 8888
        health = { http = "/api", interval = "30s", start_period = "2m" }
        backoff = "5s"
        """,
    )
    tb, nb = loaded.spec.tasks  # type: ignore[attr-defined]
    assert tb.service_spec == ServiceSpec()
    assert (ServiceSpec().backoff, ServiceSpec().backoff_cap, ServiceSpec().reset_after) == (
        10.0,
        300.0,
        600.0,
    )
    s = nb.service_spec
    assert s.port == 8888 and s.backoff_s == 5.0
    assert s.health.http == "/api" and s.health.interval_s == 30.0
    assert s.health.start_period_s == 120.0 and s.health.failures == 3


def test_a_task_that_is_not_a_service_keeps_its_hash(tmp_path: Path) -> None:
    """``service`` was added later: a task without it (or with false) keeps its run ids."""
    a = load(tmp_path, '[[tasks]]\nname = "t"\ncommand = ["true"]\n')
    b = load(tmp_path, '[[tasks]]\nname = "t"\ncommand = ["true"]\nservice = false\n')
    c = load(tmp_path, '[[tasks]]\nname = "t"\ncommand = ["true"]\nservice = true\n')
    d = load(tmp_path, '[[tasks]]\nname = "t"\ncommand = ["true"]\n[tasks.service]\n')
    tasks = [x.spec.tasks[0] for x in (a, b, c, d)]  # type: ignore[attr-defined]
    ha, hb, hc, hd = (task_hash(t) for t in tasks)
    assert ha == hb and hc == hd and ha != hc
    assert "service" not in canonical_task(tasks[0])


@pytest.mark.parametrize(
    ("body", "path", "says"),
    [
        ("[tasks.service]\nport = 0\n", "$.tasks[0].service.port", "must be at least 1"),
        (
            '[tasks.service]\nhealth = { http = "/healthz" }\n',
            "$.tasks[0].service.health.http",
            "an HTTP health check needs the service's port",
        ),
        (
            '[tasks.service]\nport = 80\nhealth = { interval = "5s" }\n',
            "$.tasks[0].service.health",
            "give exactly one of http",
        ),
        (
            '[tasks.service]\nport = 80\nhealth = { http = "healthz" }\n',
            "$.tasks[0].service.health.http",
            "",
        ),
        (
            '[tasks.service]\nbackoff = "1m"\nbackoff_cap = "10s"\n',
            "$.tasks[0].service.backoff_cap",
            "backoff_cap: 10s is less than backoff (60s)",
        ),
        (
            "[tasks.service]\nport = 80\nhealth = { command = [] }\n",
            "$.tasks[0].service.health.command",
            "command: must name a program",
        ),
    ],
)
def test_bad_service_tables_name_the_file_the_field_and_a_fix(
    tmp_path: Path, body: str, path: str, says: str
) -> None:
    err = error(tmp_path, '[[tasks]]\nname = "web"\ncommand = ["serve"]\n' + body)
    assert err.path == path
    assert err.file == str(tmp_path / "exp.toml")
    assert says in str(err)
    assert err.hint


def test_nothing_may_depend_on_a_service(tmp_path: Path) -> None:
    err = error(
        tmp_path,
        """
        [[tasks]]
        name = "web"
        command = ["serve"]
        service = true

        [[tasks]]
        name = "client"
        command = ["curl", "localhost"]
        depends_on = ["web"]
        """,
    )
    assert err.path == "$.tasks[1].depends_on[0]"
    assert "'client' depends on 'web', a service" in str(err) and "never completes" in str(err)
    assert err.hint is not None and "remove 'web' from depends_on" in err.hint
    assert err.line is not None


def test_a_service_has_no_timeout(tmp_path: Path) -> None:
    err = error(
        tmp_path, '[[tasks]]\nname = "web"\ncommand = ["serve"]\ntimeout = "1h"\nservice = true\n'
    )
    assert err.path == "$.tasks[0].timeout" and "is a service" in str(err)


def test_the_cli_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "stowplan.toml").write_text('[project]\nname = "p"\n')
    (tmp_path / "exp.toml").write_text(
        HEAD + '[[tasks]]\nname = "web"\ncommand = ["serve"]\n[tasks.service]\nport = 70000\n'
    )
    assert cli_main.main(["run", str(tmp_path / "exp.toml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'exp.toml'}:8 at $.tasks[0].service.port" in err
    assert "fix:" in err
    assert not (tmp_path / ".stowplan").exists()
