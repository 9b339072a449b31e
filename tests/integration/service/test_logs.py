"""The service's structured logs: a real ``stowplan serve --read-only`` (uvicorn on the
loopback) writes one JSON object a line, uvicorn's lines included; each request is one
``stowplan.access`` line with its method, path, route template, status and time; no token
ever reaches a line, not even a refused one."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.integration.service.conftest import Service, auth

pytestmark = pytest.mark.integration


def test_every_line_is_json_and_each_request_is_one_access_line(
    read_only_service: tuple[Service, dict[str, str]],
) -> None:
    svc, tokens = read_only_service
    with httpx.Client(base_url=svc.url, timeout=30) as c:
        assert c.get("/api/v1/experiments", headers=auth(tokens["mona"])).status_code == 200
        forged = "stp_" + "0" * 12 + "_" + "A" * 43
        assert c.get("/api/v1/runs/abcdef", headers=auth(forged)).status_code == 401
    assert svc.stop() == 0, svc.text()
    lines = [ln for ln in svc.text().splitlines() if ln.strip()]
    docs = []
    for ln in lines:
        doc = json.loads(ln)  # every line, uvicorn's startup and shutdown too
        assert {"ts", "level", "logger", "msg"} <= set(doc), ln
        docs.append(doc)
    assert any(d["logger"].startswith("uvicorn") for d in docs), lines
    access = [d for d in docs if d["logger"] == "stowplan.access"]
    listed = [d for d in access if d["path"] == "/api/v1/experiments"]
    assert [(d["method"], d["status"], d["route"]) for d in listed] == [
        ("GET", 200, "/api/v1/experiments")
    ]
    assert listed[0]["ms"] >= 0 and listed[0]["client"].startswith("127.0.0.1:")
    refused = [d for d in access if d["path"] == "/api/v1/runs/abcdef"]
    assert [(d["status"], d["route"]) for d in refused] == [(401, "/api/v1/runs/{ref}")]
    text = svc.text()
    for token in (*tokens.values(), forged):
        assert token not in text


def test_text_logs_for_a_terminal(tmp_path: Path) -> None:
    from tests.integration.service.conftest import lab

    lab(tmp_path)
    toml = tmp_path / "stowplan.toml"
    toml.write_text(toml.read_text().replace("[service]\n", '[service]\nlog_format = "text"\n'))
    svc = Service(tmp_path, read_only=True)
    try:
        svc.wait_healthy(60)
    finally:
        assert svc.stop() == 0, svc.text()
    access = [ln for ln in svc.text().splitlines() if ln.startswith("INFO    stowplan.access:")]
    assert access and "GET /healthz 200" in access[0] and "route=/healthz" in access[0], access
