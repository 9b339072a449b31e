"""The writing commands with ``--server`` against a real ``stowplan serve`` (uvicorn on the
loopback, a private local Ray with the control plane, SQLite, the local provider): ``run``
submits and follows, ``logs -f`` follows over server-sent events and resumes after a dropped
connection, ``cancel`` by experiment name; a POST whose answer was lost is retried and
creates nothing twice. The connections are dropped by a real TCP proxy between them."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stowplan.cli.main import main
from stowplan.provenance.store import RunStore
from tests.integration.service.conftest import WORK_PY, Service, auth, experiment, lab, poll

pytestmark = pytest.mark.integration

LINES = 400
TALK_PY = f"""import sys, time
for i in range({LINES}):
    print(f"line {{i}} " + "x" * 40, flush=True)
    time.sleep(0.01)
print("done", file=sys.stderr, flush=True)
""".encode()
TALK = """
[experiment]
name = "talk"

[[tasks]]
name = "say"
command = ["python", "{experiment_dir}/talk.py"]
resources = { cpus = 1, memory = "64MiB" }
"""
SLOW = """
[experiment]
name = "slow"

[[tasks]]
name = "nap"
script = "sleep 120"
resources = { cpus = 1, memory = "64MiB" }
"""
EXPECTED = b"".join(f"line {i} {'x' * 40}\n".encode() for i in range(LINES))


class CuttingProxy:
    """A TCP proxy to ``port`` on the loopback that cuts its n-th connection in the middle of
    the answer: after ``cuts[n]`` blank lines of it (the end of the headers, then of each
    server-sent event) and a few bytes more; ``0``: once the answer starts, none of it.
    Later connections pass untouched. ``requests`` keeps the head of every request."""

    def __init__(self, port: int, cuts: list[int]) -> None:
        self.port = port
        self.cuts = list(cuts)
        self.requests: list[bytes] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                cut = self.cuts.pop(0) if self.cuts else None
                self.requests.append(b"")
                n = len(self.requests) - 1
            threading.Thread(target=self._serve, args=(client, cut, n), daemon=True).start()

    def _serve(self, client: socket.socket, cut: int | None, n: int) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.port))

        def up() -> None:
            try:
                while data := client.recv(65536):
                    if len(self.requests[n]) < 4096:
                        self.requests[n] += data
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=up, daemon=True).start()
        answer = b""
        try:
            while data := upstream.recv(65536):
                if cut is not None:
                    at = _cut_point(answer + data, cut)
                    if at is not None:
                        client.sendall(data[: max(0, at - len(answer))])
                        break
                client.sendall(data)
                answer += data
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def _cut_point(answer: bytes, blank_lines: int) -> int | None:
    """Where to cut ``answer``: 20 bytes past its ``blank_lines``-th blank line (0: at once);
    None while it has not come that far."""
    if blank_lines == 0:
        return 0
    at = -1
    for _ in range(blank_lines):
        at = answer.find(b"\r\n\r\n", at + 1)
        if at < 0:
            return None
    end = at + 4 + 20
    return end if len(answer) >= end else None


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Service, dict[str, str]]]:
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    tokens = lab(lab_dir)
    svc = Service(lab_dir, read_only=False)
    try:
        svc.wait_healthy(240)
        yield svc, tokens
    finally:
        code = svc.stop()
        assert code == 0, svc.text()


def cli(
    capsys: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch, token: str, *argv: str
) -> tuple[int, str, str]:
    rc, out, err = cli_bytes(capsys, monkeypatch, token, *argv)
    return rc, out.decode(), err


def cli_bytes(
    capsys: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch, token: str, *argv: str
) -> tuple[int, bytes, str]:
    monkeypatch.setenv("STOWPLAN_TOKEN", token)
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err.decode()


@pytest.mark.timeout(900)
def test_run_logs_and_cancel_through_the_service(
    service: tuple[Service, dict[str, str]],
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    capsys = capsysbinary
    svc, tokens = service
    mine = tmp_path / "mine"  # the user's checkout: no stowplan.toml, no store
    mine.mkdir()
    (mine / "exp.toml").write_text(experiment("cats"))
    (mine / "work.py").write_bytes(WORK_PY)
    (mine / ".git").mkdir()  # hidden: not sent
    (mine / ".git" / "big").write_bytes(b"x" * 10)
    monkeypatch.chdir(mine)

    # run: the first POST's answer is lost (the proxy cuts it), the retry gets the same
    # answer, the runs are followed to the end
    proxy = CuttingProxy(svc.port, cuts=[0])
    try:
        rc, out, err = cli(
            capsys, monkeypatch, tokens["mona"], "run", "exp.toml", "--json",
            "--why", "through the service", "--server", proxy.url,
        )  # fmt: skip
    finally:
        proxy.close()
    assert rc == 0, err
    done = json.loads(out)
    assert done["experiment"] == "cats" and done["counts"] == {"SUCCEEDED": 2}, done
    posts = [r for r in proxy.requests if r.startswith(b"POST /api/v1/experiments ")]
    assert len(posts) == 2, proxy.requests  # the lost one and its retry
    with httpx.Client(base_url=svc.url, timeout=60) as c:
        ledger = c.get("/api/v1/ledger", headers=auth(tokens["ada"])).json()
    assert [(e["action"], e["who"], e["why"]) for e in ledger] == [
        ("submit", "mona", "through the service")
    ]
    assert ledger[0]["details"]["file"] == "exp.toml"  # not the server's workspace path
    # running it again reuses both runs
    rc, out, err = cli(capsys, monkeypatch, tokens["mona"], "run", "exp.toml", "--server", svc.url)
    assert rc == 0 and "2 succeeded; 2 reused" in out, (out, err)

    # logs -f of a live run, over a connection the proxy cuts mid-stream: all of it, once
    (mine / "talk").mkdir()
    (mine / "talk" / "talk.toml").write_text(TALK)
    (mine / "talk" / "talk.py").write_bytes(TALK_PY)
    import base64

    with httpx.Client(base_url=svc.url, timeout=120) as c:
        r = c.post(
            "/api/v1/experiments",
            headers=auth(tokens["mona"]),
            json={
                "request_id": "talk-00000001",
                "filename": "talk.toml",
                "experiment": TALK,
                "files": {"talk.py": base64.b64encode(TALK_PY).decode()},
            },
        )
        assert r.status_code == 201, r.text
        run_id = r.json()["run_ids"][0]

        def started() -> Any:
            got = c.get(f"/api/v1/runs/{run_id}", headers=auth(tokens["mona"])).json()
            return got if got["attempts"] else None

        poll("the talking run to start", 120, started)
    proxy = CuttingProxy(svc.port, cuts=[3])  # the headers, two events, a bit
    try:
        rc, out_bytes, err = cli_bytes(
            capsys, monkeypatch, tokens["tara"], "logs", run_id[:12], "-f", "--server", proxy.url
        )
    finally:
        proxy.close()
    assert rc == 0, err
    assert out_bytes == EXPECTED, out_bytes[-300:]
    assert len(proxy.requests) >= 2
    assert b"last-event-id: " in proxy.requests[1].lower(), proxy.requests[1]
    # the finished log again, without following; its stderr; another team is refused
    rc, got, err = cli_bytes(
        capsys, monkeypatch, tokens["mona"], "logs", run_id, "--server", svc.url
    )
    assert rc == 0 and got == EXPECTED, err
    rc, got, err = cli_bytes(
        capsys, monkeypatch, tokens["mona"], "logs", run_id, "--stderr", "--server", svc.url
    )
    assert rc == 0 and got == b"done\n", err
    rc, _, err = cli(capsys, monkeypatch, tokens["nora"], "logs", run_id, "--server", svc.url)
    assert rc == 2 and "answered 403" in err, err
    # resuming from a byte offset gives the rest; a bad offset is a 400
    with httpx.Client(base_url=svc.url, timeout=60) as c:
        r = c.get(
            f"/api/v1/runs/{run_id}/logs",
            headers={**auth(tokens["mona"]), "Last-Event-ID": str(len(EXPECTED) - 10)},
        )
        assert r.status_code == 200 and "text/event-stream" in r.headers["content-type"]
        chunks = [
            base64.b64decode(line.removeprefix("data: "))
            for line in r.text.splitlines()
            if line.startswith("data: ") and line != "data: "
        ]
        assert b"".join(chunks) == EXPECTED[-10:]
        r = c.get(
            f"/api/v1/runs/{run_id}/logs",
            headers={**auth(tokens["mona"]), "Last-Event-ID": "../../etc"},
        )
        assert r.status_code == 400 and "Last-Event-ID" in r.json()["detail"], r.text

    # cancel by experiment name: refused to another team and to a teammate's member,
    # done by the team admin, recorded under their name
    (mine / "slow").mkdir()
    (mine / "slow" / "slow.toml").write_text(SLOW)
    with httpx.Client(base_url=svc.url, timeout=120) as c:
        r = c.post(
            "/api/v1/experiments",
            headers=auth(tokens["mona"]),
            json={"request_id": "slow-00000001", "filename": "slow.toml", "experiment": SLOW},
        )
        assert r.status_code == 201, r.text
        slow_id = r.json()["run_ids"][0]
        poll(
            "the slow run to start",
            120,
            lambda: (
                c.get(f"/api/v1/runs/{slow_id}", headers=auth(tokens["mona"])).json()["attempts"]
                or None
            ),
        )
    for who in ("nora", "mike"):
        rc, _, err = cli(capsys, monkeypatch, tokens[who], "cancel", "slow", "--server", svc.url)
        assert rc == 2 and "answered 403" in err, (who, err)
    rc, out, err = cli(
        capsys, monkeypatch, tokens["tara"], "cancel", "slow", "--why", "too slow",
        "--server", svc.url,
    )  # fmt: skip
    assert rc == 0 and "cancelled 1 run through the service" in out, (out, err)

    def cancelled() -> Any:
        rc, out, _ = cli(
            capsys, monkeypatch, tokens["tara"], "show", slow_id, "--json", "--server", svc.url
        )
        assert rc == 0
        return True if json.loads(out)["run"]["state"] == "CANCELLED" else None

    poll("the slow run to be cancelled", 120, cancelled)
    rc, out, _ = cli(capsys, monkeypatch, tokens["tara"], "cancel", "slow", "--server", svc.url)
    assert rc == 0 and "nothing to cancel" in out
    with RunStore(svc.root / ".stowplan" / "stowplan.db") as store:
        ledger = [(e.action, e.who, e.why) for e in store.ledger()]
    assert ledger[-1] == ("cancel", "tara", "too slow"), ledger
    assert not (svc.root / "workspaces" / "vision" / "mona" / "talk-00000001" / ".git").exists()
