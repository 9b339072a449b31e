"""The dashboard in a real browser: Playwright driving Debian's Chromium against a real
``stowplan serve`` (uvicorn on the loopback, a private local Ray, SQLite, the local provider).

A person logs in with a token, sees the lab's queues and why a run waits, watches an
experiment's runs change state without reloading, reads a run's log and lineage, and is
refused another team's run and its log. Screenshots are kept under ``$STOWPLAN_ARTIFACTS`` (or
the test's tmp dir) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.service.conftest import Service, auth, lab, poll

pytestmark = pytest.mark.integration

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

GATE_PY = b"""import os, sys, time
print("started", flush=True)
deadline = time.monotonic() + 600
while not os.path.exists(sys.argv[1]):  # the test opens the gate
    if time.monotonic() > deadline:
        sys.exit("the gate never opened")
    time.sleep(0.05)
print("through the gate", flush=True)
"""

GATED = """
[experiment]
name = "gated"

[[tasks]]
name = "first"
command = ["python", "{{experiment_dir}}/gate.py", "{gate}"]
resources = {{ cpus = 1, memory = "64MiB" }}

[[tasks]]
name = "second"
command = ["python", "-c", "print('second ran')"]
depends_on = ["first"]
resources = {{ cpus = 1, memory = "64MiB" }}
"""

OTHER = """
[experiment]
name = "nlp-secret"

[[tasks]]
name = "leak"
command = ["python", "-c", "print('nlp secret 42')"]
resources = { cpus = 1, memory = "64MiB" }
"""


def _unavailable(why: str) -> None:
    if CI:
        pytest.fail(f"the dashboard's browser tests cannot run: {why}")
    pytest.skip(f"the dashboard's browser tests cannot run: {why}")


def chromium_path() -> str:
    path = os.environ.get("STOWPLAN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        _unavailable(f"no Chromium at {path} (apt-get install chromium)")
    return path


def artifacts_dir(tmp_path: Path) -> Path:
    base = os.environ.get("STOWPLAN_ARTIFACTS")
    d = Path(base) / "dashboard" if base else tmp_path / "artifacts"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        _unavailable(f"the playwright package is not installed ({e})")
    exe = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def submit(c: httpx.Client, token: str, request_id: str, text: str, **files: bytes) -> str:
    import base64

    r = c.post(
        "/api/v1/experiments",
        json={
            "request_id": request_id,
            "filename": "exp.toml",
            "experiment": text,
            "files": {k: base64.b64encode(v).decode() for k, v in files.items()},
        },
        headers=auth(token),
    )
    assert r.status_code == 201, r.text
    experiment_id: str = r.json()["experiment_id"]
    return experiment_id


def runs_of(c: httpx.Client, token: str, name: str) -> dict[str, dict[str, Any]]:
    r = c.get(f"/api/v1/experiments/{name}/status", headers=auth(token))
    assert r.status_code == 200, r.text
    return {row["task"]: row for row in r.json()}


@pytest.mark.timeout(900)
def test_dashboard_in_a_browser(tmp_path: Path, browser: Any) -> None:
    from playwright.sync_api import expect

    shots = artifacts_dir(tmp_path)
    gate = tmp_path / "gate.open"
    tokens = lab(tmp_path)
    svc = Service(tmp_path, read_only=False)
    try:
        svc.wait_healthy(240)
        with httpx.Client(base_url=svc.url, timeout=300) as c:
            submit(
                c,
                tokens["mona"],
                "gated-00000001",
                GATED.format(gate=gate),
                **{"gate.py": GATE_PY},
            )
            submit(c, tokens["nora"], "secret-00000001", OTHER)
            secret = runs_of(c, tokens["nora"], "nlp-secret")["leak"]["run_id"]
            runs = poll(
                "the first run to start",
                240,
                lambda: (
                    r
                    if (r := runs_of(c, tokens["mona"], "gated"))["first"]["state"] == "RUNNING"
                    else None
                ),
            )
        first, second = runs["first"]["run_id"], runs["second"]["run_id"]
        assert runs["second"]["state"] == "PENDING"

        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(30_000)

        # not logged in: the login page; a bad token is refused there
        page.goto(f"{svc.url}/ui/experiments/gated")
        expect(page).to_have_url(f"{svc.url}/ui/login?next=/ui/experiments/gated")
        page.fill("#token", "stp_nothing_forged")
        page.click("#login")
        expect(page.locator("#login-error")).to_be_visible()
        page.fill("#token", tokens["mona"])
        page.click("#login")
        expect(page).to_have_url(f"{svc.url}/ui/experiments/gated")
        expect(page.locator("#who")).to_contain_text("mona · member of vision")

        # the lab: mona's waiting run, and why it waits
        page.goto(f"{svc.url}/ui/")
        row = page.locator(f'#waiting tr[data-run="{second}"]')
        expect(row.locator(".why")).to_have_text(
            "waits on upstream 1 run of first not yet succeeded"
        )
        vision = page.locator('#queues tr[data-team="vision"]')
        expect(vision.locator(".waiting")).to_have_text("1")
        expect(vision.locator(".running")).to_have_text("1")
        expect(vision.locator(".cpus")).to_have_text("1")
        expect(page.locator("svg.plot")).to_be_visible()
        assert page.locator(f'#waiting tr[data-run="{secret}"]').count() == 0  # nlp's
        page.screenshot(path=str(shots / "lab.png"), full_page=True)

        # the experiment: states change live, without a reload
        page.goto(f"{svc.url}/ui/experiments/gated")
        rows = {
            "first": page.locator(f'#runs tr[data-run="{first}"]'),
            "second": page.locator(f'#runs tr[data-run="{second}"]'),
        }
        expect(rows["first"].locator(".state")).to_have_text("RUNNING")
        expect(rows["second"].locator(".state")).to_have_text("PENDING")
        expect(rows["second"].locator(".why")).to_contain_text("waits on upstream 1 run of first")
        page.screenshot(path=str(shots / "experiment-waiting.png"), full_page=True)
        page.evaluate("window.__notReloaded = 42")
        gate.touch()
        expect(rows["first"].locator(".state")).to_have_text("SUCCEEDED", timeout=180_000)
        expect(rows["second"].locator(".state")).to_have_text("SUCCEEDED", timeout=180_000)
        expect(rows["second"].locator(".why")).to_have_text("")
        assert page.evaluate("window.__notReloaded") == 42
        page.screenshot(path=str(shots / "experiment-done.png"), full_page=True)

        # a run: its log, lineage and provenance
        page.goto(f"{svc.url}/ui/runs/{first}")
        expect(page.locator("#state")).to_have_text("SUCCEEDED")
        expect(page.locator("#log")).to_contain_text("started\nthrough the gate")
        expect(page.locator("#log-status")).to_contain_text("all of its log")
        expect(page.locator("#lineage")).to_contain_text("second[0]")
        expect(page.locator("svg.lineage")).to_contain_text("second[0] SUCCEEDED")
        expect(page.locator("#provenance")).to_contain_text("environment")
        page.screenshot(path=str(shots / "run.png"), full_page=True)

        # another team's run: refused, and so is its log
        resp = page.goto(f"{svc.url}/ui/runs/{secret}")
        assert resp is not None and resp.status == 403
        expect(page.locator("#denied")).to_contain_text("another team")
        assert "nlp secret" not in page.content()
        log = page.request.get(f"{svc.url}/ui/runs/{secret}/log.json")
        assert log.status == 403 and "nlp secret" not in log.text()
        page.screenshot(path=str(shots / "denied.png"), full_page=True)

        # nora sees her own run's log
        other = browser.new_page()
        other.goto(f"{svc.url}/ui/login")
        other.fill("#token", tokens["nora"])
        other.click("#login")
        other.goto(f"{svc.url}/ui/runs/{secret}")
        expect(other.locator("#log")).to_contain_text("nlp secret 42", timeout=120_000)
        other.screenshot(path=str(shots / "own-team.png"), full_page=True)

        # the JSON twins are authorised like the API (a header works as well as the cookie)
        twins = [
            "/ui/experiments/nlp-secret/runs.json",
            f"/ui/runs/{secret}/state.json",
            f"/ui/runs/{secret}/log.json",
        ]
        with httpx.Client(base_url=svc.url, timeout=60) as c:
            for url in twins:
                assert c.get(url).status_code == 401, url
                forged = {"Cookie": "stowplan_token=stp_x_y"}
                assert c.get(url, headers=forged).status_code == 401, url
                for user in ("vera", "mona", "tara"):  # vision, every role
                    r = c.get(url, headers=auth(tokens[user]))
                    assert r.status_code == 403 and "nlp secret" not in r.text, (url, user)
                assert c.get(url, headers=auth(tokens["nora"])).status_code == 200, url
                assert c.get(url, headers=auth(tokens["ada"])).status_code == 200, url  # admin
            mine = c.get(f"/ui/runs/{first}/log.json", headers=auth(tokens["vera"]))
            assert mine.status_code == 200 and "through the gate" in mine.json()["text"]
            page_403 = c.get("/ui/experiments/nlp-secret", headers=auth(tokens["vera"]))
            assert page_403.status_code == 403 and "nlp secret" not in page_403.text
    finally:
        code = svc.stop()
    assert code == 0, svc.text()
    assert {p.name for p in shots.iterdir()} >= {"lab.png", "run.png", "denied.png"}


def _run(**kw: Any) -> Any:
    from stowplan.provenance.records import RunRecord

    base: dict[str, Any] = {
        "run_id": "a" * 64,
        "experiment_id": "e" * 64,
        "experiment": "x",
        "task": "t",
        "index": 0,
        "params": {},
        "seed": 0,
        "replicate": 0,
        "depends_on": [],
        "identity": {},
        "task_spec": {},
        "provenance": "p",
    }
    return RunRecord(**{**base, **kw})


def test_why_a_run_waits_in_words() -> None:
    from stowplan.service.dashboard import waiting_reason

    ups = {
        "u1": _run(run_id="u1", task="train", state="RUNNING"),
        "u2": _run(run_id="u2", task="train", state="SUCCEEDED"),
        "u3": _run(run_id="u3", task="prep", state="READY"),
    }
    pending = _run(state="PENDING", depends_on=["u1", "u2", "u3"])
    assert waiting_reason(pending, ups) == (
        "waits on upstream 1 run of prep, 1 run of train not yet succeeded"
    )
    budget = "the budget of $10.00 a month is spent: it waits for the next month"
    assert waiting_reason(_run(state="READY", reason=budget), {}) == budget
    assert waiting_reason(_run(state="READY"), {}).startswith("waits for capacity")
    assert "queued by the provider on gpu-a" in waiting_reason(
        _run(state="QUEUED", pool="gpu-a"), {}
    )
    retry = waiting_reason(
        _run(state="RETRYING", attempts=2, failure="preempted", reason="spot reclaimed"), {}
    )
    assert retry == "attempt 2 failed (preempted): spot reclaimed; waits to be placed again"
    assert "lease expired" in waiting_reason(_run(state="LOST"), {})


def test_svg_is_drawn_on_the_server_and_escapes_what_it_shows() -> None:
    from stowplan.service.dashboard import Series, svg_lineage, svg_plot

    plot = str(
        svg_plot(
            [Series("<b>cpus</b>", [(0.0, 1.0), (60.0, 3.0)], "cpu")],
            title="a & b",
            unit="CPUs",
            t0=0.0,
            t1=60.0,
        )
    )
    assert plot.startswith("<svg") and "<polyline" in plot
    assert "<b>" not in plot and "&lt;b&gt;cpus" in plot and "a &amp; b" in plot
    graph = str(svg_lineage([("up<script>", "/ui/runs/1")], "me", [("down", "")]))
    assert "<script>" not in graph and 'href="/ui/runs/1"' in graph
    assert graph.count("<line") == 2
