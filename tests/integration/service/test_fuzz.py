"""The API fuzzed by schemathesis against its own OpenAPI document (``/schema/openapi.json``):
a real ``stowplan serve`` (uvicorn on the loopback, SQLite, a Ray control plane) with real
tokens, real recorded experiments and a run that really ran, so the fuzzer's ids reach past 404.

Every answer is checked: never a 5xx; its status, content type, headers and body are the ones
the document states; a request the document forbids is refused with a 4xx; a request it allows
is not refused with a 400, except where the document cannot say what is valid (an experiment
file's contents, an output's name in the store).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from stowplan.service.api import REL_PATH_PATTERN, RUN_REF_PATTERN
from tests.integration.service.conftest import Service, auth, body, lab, poll
from tests.integration.service.test_authz import _counts, seed

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_EXAMPLES = int(os.environ.get("STOWPLAN_FUZZ_EXAMPLES", "25"))
"""Per operation and phase: 25 take well under a minute on two cores; set
STOWPLAN_FUZZ_EXAMPLES (and STOWPLAN_FUZZ_SEED) to search longer and elsewhere."""
SEED = int(os.environ.get("STOWPLAN_FUZZ_SEED", "20261205"))
"""A fixed seed: the same requests every run, so a failure reproduces (the output says how)."""

SEMANTIC = (
    "POST /api/v1/experiments",
    "POST /api/v1/plan",
    "GET /api/v1/lineage/{target}",
    "POST /api/v1/replays",
)
"""Where a schema-valid request may still be refused with a 400: an experiment file the
document can only call a string, a lineage target or replay target that names nothing in the
store."""


def _schemathesis() -> list[str]:
    try:
        import schemathesis  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
        pytest.skip("schemathesis is not installed (the test extra)")
    return [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()"]


def _toml(value: Any) -> str:
    return json.dumps(value)  # a JSON string or list of strings is a TOML one


def config(token: str, ids: list[str]) -> str:
    """schemathesis.toml: the admin's token, the ids it mixes in, the checks."""
    lines = [
        f"seed = {SEED}",
        "workers = 1",
        "request-timeout = 120",
        "",
        "[headers]",
        f"Authorization = {_toml('Bearer ' + token)}",
        "",
        "[generation]",
        f"max-examples = {MAX_EXAMPLES}",
        'database = "none"',
        "",
        "[checks]",
        # NOTE: Litestar answers OPTIONS with the Allow header of the first method routed on a
        # path (GET /api/v1/experiments: "GET, OPTIONS", not POST); its 405s list them all
        "allow_header_conformance.enabled = false",
        "",
        "[dictionaries.ids]",
        f"values = {_toml(ids)}",
        "",
        "[parameters]",
        *(
            f'"path.{name}" = {{ dictionary = "ids", probability = 0.5 }}'
            for name in ("ref", "a", "b", "target")
        ),
        "",
        "[[operations]]",
        f"include-name = {_toml(list(SEMANTIC))}",
        "checks.positive_data_acceptance.enabled = false",
    ]
    return "\n".join(lines) + "\n"


def test_the_api_conforms_to_its_own_openapi_document(tmp_path: Path) -> None:
    cmd = _schemathesis()
    tokens = lab(tmp_path)
    seeded = seed(tmp_path)
    svc = Service(tmp_path, read_only=False)
    try:
        svc.wait_healthy(240)
        with httpx.Client(base_url=svc.url, timeout=60, headers=auth(tokens["mona"])) as c:
            r = c.post("/api/v1/experiments", json=body("fuzzed", "req-fuzz-0001"))
            assert r.status_code == 201, r.text
            ran = r.json()

            def finished() -> Any:
                got = c.get("/api/v1/experiments/fuzzed/status").json()
                return got if all(x["state"] == "SUCCEEDED" for x in got) else None

            poll("the submitted runs to finish", 120, finished)
        runs = [*ran["run_ids"], *seeded.values()]
        with httpx.Client(base_url=svc.url, timeout=60, headers=auth(tokens["ada"])) as c:
            experiments = [e["id"] for e in c.get("/api/v1/experiments").json()]
            doc = c.get("/schema/openapi.json").json()
        ids = sorted({*runs, *(r[:12] for r in runs), *experiments})
        before = _counts(tmp_path)
        (tmp_path / "schemathesis.toml").write_text(config(tokens["ada"], ids))
        done = subprocess.run(
            [
                *cmd,
                "--config-file",
                str(tmp_path / "schemathesis.toml"),
                "--no-color",
                "run",
                f"{svc.url}/schema/openapi.json",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, out
        assert "failures" not in out.split("SUMMARY")[-1].lower(), out
        operations = sum(len(item) for item in doc["paths"].values())
        assert f"Tested: {operations}" in out, out  # every operation of the document
        # no request it made was a valid submission: no experiment, run, submission, owner or
        # workspace more (its cancels of the seeded runs add ledger entries)
        after = _counts(tmp_path)
        assert [after[i] for i in (0, 1, 3, 4, 5)] == [before[i] for i in (0, 1, 3, 4, 5)], (
            before,
            after,
        )
    finally:
        assert svc.stop() == 0, svc.text()
    assert "Traceback" not in svc.text(), svc.text()


def test_the_document_says_what_the_handlers_hold_requests_to(
    read_only_service: tuple[Service, dict[str, str]],
) -> None:
    """Each of these made the fuzzer fail before it was fixed: what the document left out
    or said wrong."""
    svc, _ = read_only_service
    doc = httpx.get(f"{svc.url}/schema/openapi.json", timeout=30).json()
    schemas = doc["components"]["schemas"]
    for name in ("SubmitRequest", "PlanRequest", "CancelRequest"):
        assert schemas[name]["additionalProperties"] is False, name  # unknown fields: 400
    files = schemas["SubmitRequest"]["properties"]["files"]
    assert files["propertyNames"]["pattern"] == REL_PATH_PATTERN
    assert files["additionalProperties"] == {"type": "string", "contentEncoding": "base64"}
    assert schemas["PlanRequest"]["properties"]["budget"]["minimum"] == 0  # ge=0 was lost
    ops = {(m.upper(), p): op for p, item in doc["paths"].items() for m, op in item.items()}
    ref = {x["name"]: x["schema"] for x in ops["GET", "/api/v1/runs/{ref}"]["parameters"]}
    assert ref["ref"]["pattern"] == RUN_REF_PATTERN
    for (_, path), op in ops.items():
        if path.startswith("/api/v1/"):
            assert {"400", "401", "403", "404", "413", "503"} <= set(op["responses"]), path
            assert "security" not in op, path  # the document's: a bearer token
    assert doc["security"] == [{"token": []}]
    assert ops["GET", "/readyz"]["security"] == [{}] and "503" in ops["GET", "/readyz"]["responses"]
    assert "200" in ops["POST", "/api/v1/experiments"]["responses"]  # a retried request id
    diff = ops["GET", "/api/v1/diff/{a}/{b}"]["responses"]["200"]["content"]
    assert diff["application/json"]["schema"]["type"] == "object"  # was "string"
    logs = ops["GET", "/api/v1/runs/{ref}/logs"]["responses"]["200"]["content"]
    assert list(logs) == ["text/event-stream"]  # was application/json


@pytest.mark.parametrize(
    ("path", "data", "field"),
    [
        ("/api/v1/plan", {"json": 0}, "$.json"),
        ("/api/v1/plan", {"json": "true"}, "$.json"),
        ("/api/v1/plan", {"budget": "5"}, "$.budget"),
        ("/api/v1/plan", {"explain": None, "budget": True}, "$.budget"),
        ("/api/v1/experiments", {"request_id": "req-strict-01", "files": {"a.py": 1}}, "$.files"),
    ],
)
def test_a_wrong_type_is_refused_not_converted(
    read_only_service: tuple[Service, dict[str, str]], path: str, data: dict[str, Any], field: str
) -> None:
    """Litestar converts leniently (``0`` to ``False``, ``"5"`` to ``5.0``); the document
    says boolean and number, and so does the service: a 400 naming the field."""
    svc, tokens = read_only_service
    before = _counts(svc.root)
    req = {"filename": "exp.toml", "experiment": body("x", "req-strict-00")["experiment"], **data}
    r = httpx.post(f"{svc.url}{path}", json=req, headers=auth(tokens["mona"]), timeout=60)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail.startswith(f"invalid request: {field}") and "Expected" in detail, detail
    assert _counts(svc.root) == before


@pytest.mark.parametrize("path", ["/api/v1/experiments", "/api/v1/plan"])
@pytest.mark.parametrize(
    "files",
    [
        ["0/0", "0/0/0"],  # what the fuzzer found: a 500 from writing the workspace
        ["data", "data/x.csv", "work.py"],
        ["exp.toml/work.py"],  # the experiment file's name as a directory
    ],
)
def test_a_name_that_is_a_file_and_a_directory_is_refused(
    read_only_service: tuple[Service, dict[str, str]], path: str, files: list[str]
) -> None:
    svc, tokens = read_only_service
    before = _counts(svc.root)
    req = body("clash", "req-clash-01")
    req["files"] = {name: "eA==" for name in files}
    if path.endswith("plan"):
        del req["request_id"]
    r = httpx.post(f"{svc.url}{path}", json=req, headers=auth(tokens["mona"]), timeout=60)
    assert r.status_code == 400, r.text
    assert "is a file and also the directory of" in r.json()["detail"], r.text
    assert r.json()["detail"].startswith("invalid request: $.files: "), r.text
    assert _counts(svc.root) == before
    assert "Traceback" not in svc.text()


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/experiments",
        "/api/v1/plan",
        "/api/v1/runs/{run}/cancel",
        "/api/v1/runs/{run}/approve",
        "/api/v1/experiments/cats/cancel",
    ],
)
def test_a_body_over_max_body_is_413_on_every_post(
    read_only_service: tuple[Service, dict[str, str]], path: str
) -> None:
    """``[service] max_body`` (256 KiB in the lab): refused before it is decoded or read on."""
    svc, tokens = read_only_service
    run = seed(svc.root)["cats"]
    before = _counts(svc.root)
    big = {"why": "x" * (300 * 1024)}
    r = httpx.post(
        svc.url + path.format(run=run), json=big, headers=auth(tokens["ada"]), timeout=60
    )
    assert r.status_code == 413, r.text
    assert r.json()["detail"], r.text
    assert _counts(svc.root) == before
