"""Money: `stowplan prices`, the billing rule, cost records in the store and what `show`,
`status` and `ls` print of them, and `[policy] budget` (no Ray, no cloud)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stowplan.cli import main as cli_main
from stowplan.provenance.records import AttemptRecord, ProvenanceRecord
from stowplan.provenance.store import SCHEMA_VERSION, RunStore
from stowplan.provenance.store.schema import SCHEMA_V2, SCHEMA_V3, SCHEMA_V4
from stowplan.providers.aws import prices
from stowplan.providers.aws.prices import Busy, bill
from stowplan.spec.canonical import attempt_key
from stowplan.spec.models import Policy, SpendBudget
from tests.unit.provenance.test_store import experiment, intent, run

AWS = """
[providers.cloud]
kind = "aws"
regions = ["us-east-1"]
bucket = "s3://bkt/sp"
ami = "/aws/service/ami"
"""


# -- stowplan prices ----------------------------------------------------------------------------


def test_prices_shows_the_tables_date_source_and_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main.main(["prices", "--region", "us-east-1", "--project-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = prices.bundled()
    assert f"EC2 price table of {table.date}" in out
    assert "source: Approximate Linux" in out and "licence: Apache-2.0" in out
    g5 = next(
        line for line in out.splitlines() if line.split()[:3] == ["us-east-1", "│", "g5.xlarge"]
    )
    p = table.regions["us-east-1"]["g5.xlarge"]
    assert "us-east-1" in g5 and f"${p.on_demand:.4f}" in g5 and f"${p.spot:.4f}" in g5
    assert p.interruption is not None and p.interruption in g5
    assert "eu-west-1" not in out.split("licence:")[1]  # one region asked for


def test_prices_json_and_a_providers_own_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = {
        "date": "2031-01-01",
        "source": "our finance team",
        "licence": "internal",
        "regions": {"us-east-1": {"g5.xlarge": {"on_demand": 0.5}}},
    }
    (tmp_path / "p.json").write_text(json.dumps(own))
    (tmp_path / "stowplan.toml").write_text(AWS + f'prices = "{tmp_path / "p.json"}"\n')
    assert cli_main.main(["prices", "--json", "--project-dir", str(tmp_path)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["date"], got["source"], got["file"]) == (
        "2031-01-01",
        "our finance team",
        str(tmp_path / "p.json"),
    )
    assert got["prices"] == [
        {
            "region": "us-east-1",
            "instance_type": "g5.xlarge",
            "on_demand": 0.5,
            "spot": None,
            "interruption": None,
        }
    ]
    # --file wins over the provider's
    bundled = str(prices.BUNDLED)
    assert (
        cli_main.main(["prices", "--json", "--file", bundled, "--project-dir", str(tmp_path)]) == 0
    )
    assert json.loads(capsys.readouterr().out)["date"] == prices.bundled().date


def test_prices_of_a_bad_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.json").write_text('{"date": "x"}')
    assert cli_main.main(["prices", "--file", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "--file" in err and "is not a price table" in err and "fix:" in err
    assert "stowplan.toml" not in err  # the file named is the one given, not the project's


# -- the billing rule ---------------------------------------------------------------------------


def test_an_instance_is_billed_at_least_a_minute() -> None:
    assert bill([Busy(key="a", instance="i-1", started_at=0, ended_at=10)]) == {"a": 60.0}


def test_attempts_sharing_an_instance_split_its_busy_time_by_their_durations() -> None:
    got = bill(
        [
            Busy(key="a", instance="i-1", started_at=0, ended_at=100),
            Busy(key="b", instance="i-1", started_at=50, ended_at=150),  # overlaps a
            Busy(key="c", instance="i-1", started_at=1000, ended_at=1200),  # later, alone
            Busy(key="d", instance="i-2", started_at=0, ended_at=30),  # another instance
        ]
    )
    # i-1 was busy 150 + 200 s; a and b ran 100 s each, c 200 s
    assert got == pytest.approx({"a": 87.5, "b": 87.5, "c": 175.0, "d": 60.0})
    assert sum(got[k] for k in "abc") == pytest.approx(350.0)


def test_costs_price_finished_attempts_of_the_providers_pools_only() -> None:
    table = prices.bundled()

    def a(key: str, pool: str, **kw: Any) -> AttemptRecord:
        return AttemptRecord(
            key=key, run_id="r", attempt=1, provider="cloud", pool=pool, state="SUCCEEDED", **kw
        )

    got = prices.costs(
        "cloud",
        table,
        [
            a("k1", "cloud/us-east-1/g5.xlarge", job_id="i-1", started_at=0.0, ended_at=3600.0),
            a("k2", "cloud/us-east-1/g5.xlarge/spot", job_id="i-2", started_at=0.0, ended_at=5.0),
            a("k3", "cloud/us-east-1/g5.xlarge", job_id="i-3", started_at=0.0),  # running
            a("k4", "local", job_id="9", started_at=0.0, ended_at=9.0),  # not an aws pool
        ],
    )
    p = table.regions["us-east-1"]["g5.xlarge"]
    assert [(c.key, c.instance_type, c.market, c.billed_s, c.usd) for c in got] == [
        ("k1", "g5.xlarge", "on-demand", 3600.0, round(p.on_demand, 6)),
        ("k2", "g5.xlarge", "spot", 60.0, round(60 * (p.spot or 0) / 3600, 6)),
    ]


# -- cost records in the store, and what the commands show -------------------------------------


def _priced_store(root: Path) -> tuple[str, str, str]:
    """A project store with one experiment of three runs on the aws provider: two packed on one
    instance, one alone for 10 s; costs recorded the way the control plane records them."""
    (root / "stowplan.toml").write_text('[project]\nname = "p"\n' + AWS)
    e = experiment()
    with RunStore(root / ".stowplan" / "stowplan.db") as store:
        prov = store.put_provenance(ProvenanceRecord())
        runs = [msgspec.structs.replace(run(e, i), provenance=prov) for i in range(3)]
        store.put_experiment(e)
        store.put_runs(runs)
        pool = "cloud/us-east-1/g5.xlarge"
        store.write_intents(
            [msgspec.structs.replace(intent(r), provider="cloud", pool=pool) for r in runs]
        )
        spans = [("i-1", 0.0, 1800.0), ("i-1", 0.0, 1800.0), ("i-2", 0.0, 10.0)]
        store.update_attempts(
            [
                AttemptRecord(
                    key=attempt_key(r.run_id, 1),
                    run_id="",
                    attempt=0,
                    provider="",
                    pool="",
                    state="SUCCEEDED",
                    job_id=job,
                    started_at=s,
                    ended_at=t,
                )
                for r, (job, s, t) in zip(runs, spans, strict=True)
            ]
        )
        keys = [attempt_key(r.run_id, 1) for r in runs]
        assert prices.record_costs(store, "cloud", prices.bundled(), keys) == 3
    return e.id, runs[0].run_id, runs[2].run_id


def test_recorded_costs_are_shown_by_show_status_and_ls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eid, packed, alone = _priced_store(tmp_path)
    od = prices.bundled().regions["us-east-1"]["g5.xlarge"].on_demand
    d = ["--project-dir", str(tmp_path)]
    assert cli_main.main(["show", packed, "--json", *d]) == 0
    [att] = json.loads(capsys.readouterr().out)["attempts"]
    # two runs packed for half an hour on one instance: a quarter of an instance-hour each
    assert (att["instance_type"], att["market"], att["billed_s"]) == ("g5.xlarge", "on-demand", 900)
    assert att["usd"] == pytest.approx(od / 4, abs=1e-6)
    assert cli_main.main(["show", alone, *d]) == 0
    out = capsys.readouterr().out
    assert f"cost ${60 * od / 3600:.4f} (60 s billed, g5.xlarge on-demand)" in out

    total = od / 4 * 2 + 60 * od / 3600
    assert cli_main.main(["status", "digits", "--json", *d]) == 0
    costs = [r["cost"] for r in json.loads(capsys.readouterr().out)]
    assert sum(c["usd"] for c in costs) == pytest.approx(total, abs=1e-5)
    assert cli_main.main(["status", "digits", *d]) == 0
    assert f"${total:,.2f}" in capsys.readouterr().out

    assert cli_main.main(["ls", "--json", *d]) == 0
    [exp] = json.loads(capsys.readouterr().out)
    assert exp["id"] == eid and exp["usd"] == pytest.approx(total, abs=1e-5)
    assert cli_main.main(["ls", *d]) == 0
    assert f"${total:,.2f}" in capsys.readouterr().out


def test_a_later_attempt_on_a_shared_instance_rebills_the_earlier_ones(tmp_path: Path) -> None:
    e = experiment()
    a, b = run(e, 0), run(e, 1)
    pool = "cloud/us-east-1/g5.xlarge"
    with RunStore(tmp_path / "runs.db") as store:
        store.put_experiment(e)
        store.put_runs([a, b])
        store.write_intents(
            [msgspec.structs.replace(intent(r), provider="cloud", pool=pool) for r in (a, b)]
        )

        def ended(r: object, s: float, t: float) -> None:
            key = attempt_key(r.run_id, 1)  # type: ignore[attr-defined]
            store.update_attempts(
                [
                    AttemptRecord(
                        key=key,
                        run_id="",
                        attempt=0,
                        provider="",
                        pool="",
                        state="SUCCEEDED",
                        job_id="i-1",
                        started_at=s,
                        ended_at=t,
                    )
                ]
            )
            prices.record_costs(store, "cloud", prices.bundled(), [key])

        ended(a, 0.0, 600.0)
        assert store.attempts_for([a.run_id])[a.run_id][0].billed_s == 600.0
        ended(b, 0.0, 600.0)  # it ran beside a all along: they share the 600 s
        billed = {r: store.attempts_for([r])[r][0].billed_s for r in (a.run_id, b.run_id)}
        assert billed == {a.run_id: 300.0, b.run_id: 300.0}
        assert store.cost_since(0.0) == pytest.approx(
            600 * prices.bundled().regions["us-east-1"]["g5.xlarge"].on_demand / 3600, abs=1e-5
        )


def test_a_version_4_store_gains_the_cost_columns(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    c = sqlite3.connect(db, isolation_level=None)
    for statement in (*SCHEMA_V2, *SCHEMA_V3, *SCHEMA_V4):
        c.execute(statement)
    c.execute("PRAGMA user_version = 4")
    c.close()
    with RunStore(db) as store:
        e = experiment()
        r = run(e, 0)
        store.put_experiment(e)
        store.put_runs([r])
        store.write_intents([intent(r)])
        [got] = store.attempts_for([r.run_id])[r.run_id]
        assert (got.instance_type, got.market, got.billed_s, got.usd) == (None,) * 4
        assert store.cost_by_experiment([e.id]) == {}
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    c.close()


# -- budgets -------------------------------------------------------------------------------------


def test_a_budget_of_zero_is_refused_naming_file_field_and_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "stowplan.toml").write_text(
        '[project]\nname = "p"\n\n[policy]\nbudget = { monthly_usd = 0 }\n'
    )
    (tmp_path / "exp.toml").write_text(
        '[experiment]\nname = "e"\n\n[[tasks]]\nname = "t"\ncommand = ["true"]\n'
    )
    assert cli_main.main(["run", str(tmp_path / "exp.toml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'stowplan.toml'}:5 at $.policy.budget.monthly_usd" in err
    assert "give a positive amount" in err and "fix:" in err
    assert not (tmp_path / ".stowplan").exists()  # nothing written


def test_a_negative_per_experiment_budget_is_refused_too() -> None:
    with pytest.raises(msgspec.ValidationError, match="per_experiment_usd: a budget of -5"):
        msgspec.convert({"budget": {"per_experiment_usd": -5}}, Policy)


def test_a_budget_says_why_a_launch_is_held() -> None:
    b = SpendBudget(monthly_usd=100.0, per_experiment_usd=10.0)
    assert b.exceeded(month_usd=50.0, experiment_usd=5.0, more_usd=4.0) is None
    why = b.exceeded(month_usd=50.0, experiment_usd=8.0, more_usd=4.0)
    assert why is not None and "per-experiment budget of $10.00" in why and "$8.00 spent" in why
    why = b.exceeded(month_usd=99.0, experiment_usd=0.0, more_usd=4.0)
    assert why is not None and "monthly budget of $100.00" in why
