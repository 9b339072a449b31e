"""Bad input to a real ``stowplan serve``: a 4xx with a clear message, never a 500, and
nothing written (store, service records, workspaces, files outside)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.service.conftest import Service, auth, body
from tests.integration.service.test_authz import _counts, seed

pytestmark = pytest.mark.integration

B64 = base64.b64encode(b"print('x')\n").decode()


def cases() -> list[tuple[str, Any, int, str]]:
    """(what, JSON body or raw bytes, status, words the message must contain)."""
    ok = body("fine", "req-bad-0001")
    return [
        ("malformed JSON", b'{"request_id": "req-bad-0001",', 400, "malformed"),
        ("not an object", b"[1, 2, 3]", 400, "Expected `object`"),
        ("empty body", b"", 400, ""),
        ("wrong type", {**ok, "request_id": 12345678}, 400, "$.request_id"),
        ("files not a map", {**ok, "files": ["a"]}, 400, "$.files"),
        ("file not base64", {**ok, "files": {"a.py": "%%%"}}, 400, "base64"),
        ("unknown field", {**ok, "priority": 1}, 400, "priority"),
        ("missing field", {k: v for k, v in ok.items() if k != "experiment"}, 400, "experiment"),
        ("traversal in request id", {**ok, "request_id": "../../../../tmp/x"}, 400, "request_id"),
        ("traversal in file name", {**ok, "filename": "../escape.toml"}, 400, "filename"),
        ("absolute file name", {**ok, "filename": "/tmp/escape.toml"}, 400, "filename"),
        ("traversal in files", {**ok, "files": {"../escape.py": B64}}, 400, "files"),
        ("nested traversal", {**ok, "files": {"a/../../escape.py": B64}}, 400, "files"),
        ("absolute path in files", {**ok, "files": {"/tmp/escape.py": B64}}, 400, "files"),
        ("control chars in why", {**ok, "why": "a\x00b"}, 400, "why"),
        ("bad provider name", {**ok, "provider": "../x"}, 400, "provider"),
        ("bad TOML", {**ok, "experiment": "[experiment\nname="}, 400, "exp.toml"),
        (
            "bad field in the experiment",
            {**ok, "experiment": "[experiment]\nname = 3\n"},
            400,
            "$.experiment.name",
        ),
        ("unknown provider", {**ok, "provider": "campus"}, 400, "campus"),
        ("oversized body", {**ok, "files": {"big.bin": "A" * (300 * 1024)}}, 413, ""),
    ]


def test_bad_submissions_are_4xx_and_write_nothing(
    read_only_service: tuple[Service, dict[str, str]],
) -> None:
    svc, tokens = read_only_service
    seed(svc.root)
    before = _counts(svc.root)
    h = {**auth(tokens["mona"]), "Content-Type": "application/json"}
    with httpx.Client(base_url=svc.url, timeout=60) as c:
        for what, data, status, words in cases():
            raw = data if isinstance(data, bytes) else json.dumps(data).encode()
            r = c.post("/api/v1/experiments", content=raw, headers=h)
            assert r.status_code == status, (what, r.status_code, r.text)
            detail = r.json()["detail"]
            assert words in detail, (what, detail)
            assert str(svc.root) not in detail, (what, detail)  # no server paths
    assert _counts(svc.root) == before
    assert not list(svc.root.parent.glob("escape*"))
    assert not list(Path("/tmp").glob("escape.*"))


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/runs/..%2F..%2Fetc%2Fpasswd",
        "/api/v1/runs/%2e%2e",
        "/api/v1/runs/zz",
        "/api/v1/runs/abc",  # too short a prefix
        "/api/v1/runs/" + "a" * 65,
        "/api/v1/runs/abcdef0123",  # well formed, no such run
        "/api/v1/experiments/..%2Fsecret/status",
        "/api/v1/experiments/%2e%2e/status",
        "/api/v1/experiments/no-such-experiment/status",
        "/api/v1/experiments/" + "x" * 200 + "/status",
    ],
)
def test_bad_ids_are_4xx(read_only_service: tuple[Service, dict[str, str]], path: str) -> None:
    svc, tokens = read_only_service
    before = _counts(svc.root)
    with httpx.Client(base_url=svc.url, timeout=30) as c:
        for method in ("GET", "POST"):
            p = path if method == "GET" or "/runs/" not in path else path + "/cancel"
            if method == "POST" and "/runs/" not in path:
                continue
            r = c.request(
                method, p, headers=auth(tokens["ada"]), json={} if method == "POST" else None
            )
            assert 400 <= r.status_code < 500, (method, p, r.status_code, r.text)
            assert r.json()["detail"], (method, p)
    assert _counts(svc.root) == before


def test_bad_cancel_bodies(read_only_service: tuple[Service, dict[str, str]]) -> None:
    svc, tokens = read_only_service
    run_id = seed(svc.root)["cats"]
    before = _counts(svc.root)
    h = {**auth(tokens["mona"]), "Content-Type": "application/json"}
    with httpx.Client(base_url=svc.url, timeout=30) as c:
        for raw, words in (
            (b"{", "malformed"),
            (b'{"why": 3}', "$.why"),
            (b'{"why": "x", "force": true}', "force"),
            (json.dumps({"why": "x" * 2000}).encode(), "$.why"),
        ):
            r = c.post(f"/api/v1/runs/{run_id}/cancel", content=raw, headers=h)
            assert r.status_code == 400, (raw, r.text)
            assert words in r.json()["detail"], (raw, r.text)
    assert _counts(svc.root) == before


def test_bad_input_to_every_other_endpoint_is_4xx_and_writes_nothing(
    read_only_service: tuple[Service, dict[str, str]],
) -> None:
    """The reading endpoints' parameters, the plan's body, an experiment's cancel: a 4xx
    naming what is wrong, never a 500, nothing written (no workspace left by a plan)."""
    svc, tokens = read_only_service
    run_id = seed(svc.root)["cats"]
    before = _counts(svc.root)
    plan = {"filename": "exp.toml", "experiment": body("x", "req-plan-01")["experiment"]}
    cases: list[tuple[str, str, dict[str, Any], Any, int, str]] = [
        # (method, path, params or headers, body, status, words in the message)
        ("GET", "/api/v1/runs", {"state": "sleeping"}, None, 400, "not a run state"),
        ("GET", "/api/v1/runs", {"task": "a\x01b"}, None, 400, "control character"),
        ("GET", "/api/v1/runs", {"host": "h" * 300}, None, 400, "256"),
        ("GET", "/api/v1/runs", {"param": "lr>>1"}, None, 400, "NAME OP VALUE"),
        ("GET", "/api/v1/runs", {"param": [f"p{i}=1" for i in range(40)]}, None, 400, "param"),
        ("GET", "/api/v1/lineage/%2e%2e", {}, None, 400, "run id or artifact"),
        ("GET", "/api/v1/lineage/..%2F..%2Fetc", {}, None, 404, "Not Found"),
        ("GET", f"/api/v1/lineage/{run_id}", {"depth": "0"}, None, 400, "$.depth"),
        ("GET", f"/api/v1/lineage/{run_id}", {"depth": "x"}, None, 400, "depth"),
        ("GET", f"/api/v1/lineage/{run_id}", {"direction": "left"}, None, 400, "direction"),
        ("GET", "/api/v1/lineage/no-such-output.json", {}, None, 400, "neither a run id"),
        ("GET", f"/api/v1/runs/{run_id}/logs", {"stream": "stdin"}, None, 400, "$.stream"),
        ("GET", f"/api/v1/runs/{run_id}/logs", {"attempt": "0"}, None, 400, "$.attempt"),
        ("GET", f"/api/v1/runs/{run_id}/logs", {"follow": "perhaps"}, None, 400, "follow"),
        ("GET", "/api/v1/runs/%2e%2e/logs", {}, None, 400, "hex digits"),
        ("GET", f"/api/v1/diff/{run_id}/%2e%2e", {}, None, 400, "hex digits"),
        ("GET", f"/api/v1/diff/{run_id}/abcdef0123", {}, None, 404, "no run"),
        ("GET", "/api/v1/ledger", {"target": "../x"}, None, 400, "not a run or experiment"),
        ("POST", "/api/v1/experiments/%2e%2e/cancel", {}, {}, 400, "experiment name"),
        ("POST", "/api/v1/experiments/cats/cancel", {}, {"why": 3}, 400, "$.why"),
        ("POST", "/api/v1/experiments/cats/cancel", {}, {"all": True}, 400, "all"),
        ("POST", "/api/v1/experiments/nothing-here/cancel", {}, {}, 404, "no experiment"),
        ("POST", "/api/v1/plan", {}, b"{", 400, "malformed"),
        ("POST", "/api/v1/plan", {}, {**plan, "submit": True}, 400, "submit"),
        ("POST", "/api/v1/plan", {}, {**plan, "filename": "../x.toml"}, 400, "filename"),
        ("POST", "/api/v1/plan", {}, {**plan, "files": {"../e.py": B64}}, 400, "files"),
        ("POST", "/api/v1/plan", {}, {**plan, "explain": "../x"}, 400, "explain"),
        ("POST", "/api/v1/plan", {}, {**plan, "budget": -1}, 400, "budget"),
        ("POST", "/api/v1/plan", {}, {**plan, "provider": "../x"}, 400, "provider"),
    ]
    h = {**auth(tokens["ada"]), "Content-Type": "application/json"}
    with httpx.Client(base_url=svc.url, timeout=60) as c:
        for method, path, params, data, status, words in cases:
            raw = data if isinstance(data, bytes) or data is None else json.dumps(data).encode()
            r = c.request(method, path, params=params, content=raw, headers=h)
            assert r.status_code == status, (method, path, params, data, r.text)
            assert words in r.json()["detail"], (path, params, data, r.json()["detail"])
        r = c.get(f"/api/v1/runs/{run_id}/logs", headers={**h, "Last-Event-ID": "-1"})
        assert r.status_code == 400 and "Last-Event-ID" in r.json()["detail"], r.text
        # a plan of a bad experiment is `stowplan plan`'s exit 2 and its message, not a 500
        r = c.post(
            "/api/v1/plan",
            headers=h,
            json={**plan, "experiment": "[experiment]\nname = 3\n"},
        )
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["exit_code"] == 2 and "$.experiment.name" in got["errors"], got
        assert str(svc.root) not in got["errors"]
    assert _counts(svc.root) == before
