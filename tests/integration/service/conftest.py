"""A real ``stowplan serve`` (uvicorn on the loopback, SQLite, and for submissions a real
local Ray) in a lab project in a tmp dir, with two teams and a user of every role."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from stowplan.service.people import SERVICE_DB, People

LAB = """
[project]
name = "lab"

[providers.local]
kind = "local"
cpus = 2

[service]
max_body = "256KiB"

[service.teams.vision]
[service.teams.nlp]

[service.users.vera]
team = "vision"
role = "viewer"

[service.users.mona]
team = "vision"
role = "member"

[service.users.mike]
team = "vision"
role = "member"

[service.users.tara]
team = "vision"
role = "team-admin"

[service.users.nora]
team = "nlp"
role = "member"

[service.users.ada]
team = "nlp"
role = "admin"
"""

USERS = ("vera", "mona", "mike", "tara", "nora", "ada")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Service:
    def __init__(self, root: Path, *, read_only: bool, args: Sequence[str] = ()) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"serve-{self.port}.log"
        env = dict(os.environ)
        # tasks run `python`: this interpreter, whatever PATH the test runner had
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.pop("STOWPLAN_SERVER", None)
        cmd = [sys.executable, "-m", "stowplan.cli.main", "serve", "--port", str(self.port)]
        if read_only:
            cmd.append("--read-only")
        cmd.extend(args)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve did not answer /healthz in {timeout} s:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM, as systemd stops it; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"serve did not stop on SIGTERM:\n{self.text()}") from None


def poll(what: str, timeout: float, check: Callable[[], Any]) -> Any:
    """``check()``'s first answer that is not None, asked every 0.2 s for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got is not None:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def lab(root: Path) -> dict[str, str]:
    """Write the lab project; a token for every user."""
    (root / "stowplan.toml").write_text(LAB)
    with People(root / ".stowplan" / SERVICE_DB) as people:
        return {u: people.create_token(u)[0] for u in USERS}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def read_only_service(tmp_path: Path) -> Iterator[tuple[Service, dict[str, str]]]:
    tokens = lab(tmp_path)
    svc = Service(tmp_path, read_only=True)
    try:
        svc.wait_healthy(60)
        yield svc, tokens
    finally:
        assert svc.stop() == 0, svc.text()


def experiment(name: str, n: int = 2) -> str:
    return f"""
[experiment]
name = "{name}"

[[tasks]]
name = "work"
command = ["python", "{{experiment_dir}}/work.py", "{{i}}", "{name}"]
outputs = ["metrics.json"]
resources = {{ cpus = 1, memory = "64MiB" }}
sweep = {{ method = "grid", parameters = {{ i = {{ type = "int", low = 0, high = {n - 1} }} }} }}
"""


WORK_PY = b"""import json, sys
json.dump({"i": int(sys.argv[1]), "score": int(sys.argv[1]) ** 2}, open("metrics.json", "w"))
"""


def body(name: str, request_id: str, **extra: Any) -> dict[str, Any]:
    import base64

    return {
        "request_id": request_id,
        "filename": "exp.toml",
        "experiment": experiment(name),
        "files": {"work.py": base64.b64encode(WORK_PY).decode()},
        **extra,
    }
