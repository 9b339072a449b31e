"""Cost and ``[policy] budget`` through a real ``stowplan run`` on the AWS provider (moto's server,
the instances' agents run locally by ``Fleet``): every attempt that ended records its instance
type, market, billed seconds and dollars (the store actor bills them as the reports arrive),
shown by ``stowplan status``/``ls``; and a run whose launch would break the budget is held
READY with the reason ``stowplan status`` shows, no instance launched."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from stowplan.provenance.store import RunStore
from stowplan.providers.aws import prices
from tests.integration.aws.harness import Fleet, instances, project_toml
from tests.integration.aws.proxy import LossyProxy
from tests.integration.aws.test_e2e import env, finish, start, stowplan

pytestmark = pytest.mark.integration

PRICE = prices.bundled().regions["us-east-1"]["g5.xlarge"].on_demand


def project(tmp_path: Path, policy: str = "") -> Path:
    (tmp_path / "stowplan.toml").write_text(project_toml("aws-cost"))
    f = tmp_path / "exp" / "tiny.toml"
    f.parent.mkdir()
    f.write_text(
        '[experiment]\nname = "tiny"\n\n'
        + (f"[policy]\n{policy}\n\n" if policy else "")
        + '[[tasks]]\nname = "t"\ncommand = ["python", "-c", "print({i})"]\n'
        'resources = { cpus = 1, memory = "256MiB" }\ntimeout = "5m"\n\n'
        '[tasks.sweep]\nmethod = "grid"\nparameters = { i = [1, 2] }\n'
    )
    (tmp_path / ".stowplanignore").write_text("instances/\n")
    return f


def cli(tmp_path: Path, *args: str) -> str:
    got = subprocess.run(
        stowplan(tmp_path, *args),
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert got.returncode == 0, got.stderr
    return got.stdout


def test_attempts_that_end_on_aws_record_their_cost(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    _, client = aws
    f = project(tmp_path)
    with Fleet(tmp_path / "instances", client, moto_url) as fleet:
        finish(tmp_path, "run", start(tmp_path, "run", "run", str(f), "--provider", "cloud"), 300)
        fleet.check()
        fleet.wait_all_down(60)
    with RunStore(tmp_path / ".stowplan" / "stowplan.db") as store:
        (exp,) = store.list_experiments()
        runs = store.runs_for_experiment(exp.id)
        attempts = [a for got in store.attempts_for([r.run_id for r in runs]).values() for a in got]
        spent = store.cost_by_experiment([exp.id])
    assert {r.state for r in runs} == {"SUCCEEDED"} and len(attempts) == 2
    by_instance: dict[str, float] = {}
    for a in attempts:
        assert (a.instance_type, a.market) == ("g5.xlarge", "on-demand"), a
        assert a.billed_s is not None and a.usd is not None and a.job_id
        assert a.usd == pytest.approx(a.billed_s * PRICE / 3600, abs=1e-6)
        by_instance[a.job_id] = by_instance.get(a.job_id, 0.0) + a.billed_s
    # each instance billed at least its minute, split among the attempts it ran
    assert all(s >= prices.MIN_BILLED_S - 1e-3 for s in by_instance.values()), by_instance
    total = sum(a.usd or 0 for a in attempts)
    assert spent[exp.id] == pytest.approx(total)
    assert "$0." in cli(tmp_path, "status", "tiny")
    assert f"${total:,.2f}" in cli(tmp_path, "ls")


def test_a_launch_over_the_budget_is_held_with_its_reason(
    tmp_path: Path, aws: tuple[LossyProxy, Any], moto_url: str
) -> None:
    _, client = aws
    # one g5.xlarge for the 5-minute timeout is about $0.08: more than the budget
    f = project(tmp_path, "budget = { per_experiment_usd = 0.01 }")
    with Fleet(tmp_path / "instances", client, moto_url) as fleet:
        proc = start(tmp_path, "run", "run", str(f), "--provider", "cloud")
        db = tmp_path / ".stowplan" / "stowplan.db"
        reasons: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(reasons) < 2:
            assert proc.poll() is None, (tmp_path / "run.out").read_text()
            if db.exists():
                with RunStore(db) as store:
                    found = store.list_experiments()
                    runs = store.runs_for_experiment(found[0].id) if found else []
                reasons = [r.reason for r in runs if r.state == "READY" and r.reason]
            time.sleep(0.5)
        assert len(reasons) == 2, (tmp_path / "run.out").read_text()
        assert all(
            r.startswith("held: the per-experiment budget of $0.01 would be exceeded")
            for r in reasons
        ), reasons
        shown = cli(tmp_path, "status", "tiny")
        assert "READY: held: the per-experiment budget" in shown, shown
        # interrupted, the held runs are cancelled; nothing was ever launched
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(120)
        out = (tmp_path / "run.out").read_text()
        assert rc == 1 and "cancelled 2" in out, out  # not every run succeeded: exit 1
        fleet.check()
    assert instances(client) == []
