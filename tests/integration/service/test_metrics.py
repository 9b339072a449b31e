"""``GET /metrics`` of a real ``stowplan serve`` (uvicorn, a private local Ray, SQLite, the
local provider): scraped over HTTP, parsed with prometheus_client's own parser, and changed by
a submission as the runs go through the queue."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.service.conftest import Service, auth, body, lab, poll

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from stowplan.provenance.store import RunStore
    from stowplan.service.metrics import Metrics
    from stowplan.service.people import People
    from stowplan.spec.models import ServiceConfig

    with RunStore(tmp_path / "s.db") as store, People(tmp_path / "p.db") as people:
        state = SimpleNamespace(
            store=store,
            people=people,
            config=ServiceConfig(),
            project=SimpleNamespace(config=SimpleNamespace(providers={})),
        )
        one, two = Metrics(state), Metrics(state)  # type: ignore[arg-type]
        try:
            one.requests.labels("GET", "/x", "200").inc()
            labels = {"method": "GET", "route": "/x", "status": "200"}
            assert one.registry.get_sample_value("stowplan_http_requests_total", labels) == 1
            assert two.registry.get_sample_value("stowplan_http_requests_total", labels) is None
            assert two.registry.get_sample_value("stowplan_store_up") == 1
            assert not [n for n in REGISTRY._names_to_collectors if n.startswith("stowplan")]
        finally:
            one.store.close()
            two.store.close()


def test_metrics_need_no_token_and_count_requests(
    read_only_service: tuple[Service, dict[str, str]],
) -> None:
    svc, tokens = read_only_service
    before = scrape(svc.url)
    assert value(before, "stowplan_store_up") == 1
    for state in ("PENDING", "RUNNING", "SUCCEEDED"):
        assert ("stowplan_runs", (("state", state),)) in before
    for team in ("vision", "nlp", "-"):
        assert value(before, "stowplan_queue_length", team=team, state="READY") == 0
    assert value(before, "stowplan_lease_expiries_total") == 0
    assert (
        value(before, "stowplan_provider_errors_total", provider="local", failure="no_capacity")
        == 0
    )
    # requests are counted by route template, status and method
    route = "/api/v1/experiments"
    r = httpx.get(f"{svc.url}{route}", headers=auth(tokens["vera"]))
    assert r.status_code == 200
    assert httpx.get(f"{svc.url}{route}").status_code == 401
    after = scrape(svc.url)
    ok = value(after, "stowplan_http_requests_total", method="GET", route=route, status="200")
    denied = value(after, "stowplan_http_requests_total", method="GET", route=route, status="401")
    assert (
        ok
        == value(before, "stowplan_http_requests_total", method="GET", route=route, status="200")
        + 1
    )
    assert denied >= 1
    assert value(after, "stowplan_http_request_seconds_count", route=route) >= 2


@pytest.mark.timeout(900)
def test_metrics_follow_a_submission(tmp_path: Path) -> None:
    tokens = lab(tmp_path)
    svc = Service(tmp_path, read_only=False)
    try:
        svc.wait_healthy(240)
        start = scrape(svc.url)
        assert value(start, "stowplan_runs", state="SUCCEEDED") == 0
        assert value(start, "stowplan_placement_solves_total") == 0
        with httpx.Client(base_url=svc.url, timeout=300) as c:
            r = c.post(
                "/api/v1/experiments",
                json=body("squares", "metrics-00000001"),
                headers=auth(tokens["mona"]),
            )
            assert r.status_code == 201, r.text

            # right after the submission the runs are vision's, counted in some state
            queued = scrape(svc.url)
            vision = sum(
                v
                for (name, labels), v in queued.items()
                if name in ("stowplan_queue_length", "stowplan_team_running_runs")
                and ("team", "vision") in labels
            )
            done_now = value(queued, "stowplan_runs", state="SUCCEEDED")
            assert vision + done_now == 2, queued
            assert value(queued, "stowplan_queue_length", team="nlp", state="READY") == 0

            def finished() -> Samples | None:
                s = scrape(svc.url)
                return s if value(s, "stowplan_runs", state="SUCCEEDED") == 2 else None

            end = poll("both runs to succeed", 600, finished)
        assert value(end, "stowplan_runs", state="FAILED") == 0
        for state in ("PENDING", "READY", "QUEUED"):
            assert value(end, "stowplan_queue_length", team="vision", state=state) == 0
        assert value(end, "stowplan_team_running_runs", team="vision") == 0
        assert value(end, "stowplan_provider_attempts_total", provider="local") == 2
        assert value(end, "stowplan_provider_start_seconds_count", provider="local") == 2
        solves = value(end, "stowplan_placement_solves_total")
        assert solves >= 1
        assert value(end, "stowplan_placement_solve_seconds_total") > 0
        assert value(end, "stowplan_placement_last_gap") >= 0
        assert ("stowplan_placement_last_solve_seconds", ()) in end
        assert value(end, "stowplan_lease_expiries_total") == 0
        posts = value(
            end,
            "stowplan_http_requests_total",
            method="POST",
            route="/api/v1/experiments",
            status="201",
        )
        assert posts == 1
    finally:
        code = svc.stop()
    assert code == 0, svc.text()
