"""Each team's cloud spend this month, summed from a real run store (SQLite) over the
experiments the service's People database says the team submitted: only attempts that started
this calendar month (UTC) count, and only the team's own experiments."""

from __future__ import annotations

import calendar
from pathlib import Path

import msgspec

from stowplan.provenance.records import AttemptRecord
from stowplan.provenance.store import RunStore
from stowplan.service.people import SERVICE_DB, People
from stowplan.service.spending import month_start, team_spending
from stowplan.session import prepare, record

NOW = float(calendar.timegm((2026, 12, 5, 6, 0, 0, 0, 0, 0)))
DEC = float(calendar.timegm((2026, 12, 1, 0, 0, 0, 0, 0, 0)))


def test_month_start_is_the_first_second_of_the_utc_month() -> None:
    assert month_start(NOW) == DEC
    assert month_start(DEC) == DEC
    assert month_start(DEC - 1) == float(calendar.timegm((2026, 11, 1, 0, 0, 0, 0, 0, 0)))


def _experiment(root: Path, store: RunStore, name: str) -> tuple[str, list[str]]:
    d = root / name
    d.mkdir()
    (d / "exp.toml").write_text(
        f'[experiment]\nname = "{name}"\n[[tasks]]\nname = "t"\ncommand = ["echo", "{name}"]\n'
        'sweep = { parameters = { i = { type = "int", low = 0, high = 1 } } }\n'
    )
    (root / "stowplan.toml").write_text('[project]\nname = "lab"\n')
    prepared = prepare(d / "exp.toml")
    runs = record(prepared, store)
    return prepared.experiment.id, [r.run_id for r in runs]


def _cost(store: RunStore, run_id: str, key: str, started: float, usd: float) -> None:
    rec = AttemptRecord(
        key=key,
        run_id=run_id,
        attempt=1,
        provider="aws",
        pool="aws/us-east-1/g5.xlarge",
        state="SUBMITTING",
        intent_at=started,
    )
    store.write_intents([rec])
    store.update_attempts(
        [
            msgspec.structs.replace(
                rec, state="SUCCEEDED", started_at=started, ended_at=started + 60, usd=usd
            )
        ]
    )


def test_a_teams_month_is_its_own_experiments_attempts_since_the_month_began(
    tmp_path: Path,
) -> None:
    with RunStore(tmp_path / "store.db") as store, People(tmp_path / SERVICE_DB) as people:
        cats, cat_runs = _experiment(tmp_path, store, "cats")
        words, word_runs = _experiment(tmp_path, store, "words")
        people.add_owner(cats, "vision", "mona")
        people.add_owner(words, "nlp", "nora")
        _cost(store, cat_runs[0], "k1", DEC + 3600, 3.0)  # this month
        _cost(store, cat_runs[1], "k2", DEC - 3600, 100.0)  # last month: not counted
        _cost(store, word_runs[0], "k3", NOW - 60, 2.5)
        got = team_spending(store, people, ["vision", "nlp", "idle"], NOW)
    assert got == {"vision": 3.0, "nlp": 2.5, "idle": 0.0}
