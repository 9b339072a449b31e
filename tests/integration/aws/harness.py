"""The test harness standing in for EC2 booting: ``Fleet`` polls moto for the instances the
driver launched and runs each one's real user-data (the agent) as a local process, as cloud-init
would; an agent's ``halt`` terminates its instance in moto (``shutdown -h now`` with the shutdown
behaviour ``terminate``). A reclaimed (terminated) instance's processes are killed with it.

Each instance's agent reaches a fake instance metadata service (``FakeImds``, IMDSv2 on the
loopback, through ``STOWPLAN_IMDS``, which cloud-init never sets) where a test can post a spot
interruption notice for one instance (``Fleet.imds.notice``).

It also writes projects for ``stowplan run`` on the AWS provider against moto."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.integration.aws.conftest import BUCKET

MOTO_ACCOUNT = "123456789012"
"""the account moto serves without credentials of a real one"""
AMI = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"


def project_toml(name: str, provider: str = "cloud", **aws: str) -> str:
    """A ``stowplan.toml`` with ``[providers.PROVIDER]`` on moto (values are TOML text)."""
    fields = {
        "kind": '"aws"',
        "regions": '["us-east-1"]',
        "bucket": f'"s3://{BUCKET}/sp"',
        "ami": f'"{AMI}"',
        "instance_types": '["g5.xlarge"]',
        "spot": '"never"',
        "idle_shutdown": "15",
        "max_instances": "4",
        **aws,
    }
    body = "\n".join(f"{k} = {v}" for k, v in fields.items())
    return (
        f'[project]\nname = "{name}"\n\n'
        '[policy]\nretry = { max_attempts = 3, on = ["preempted", "node_failure", '
        '"provider_transient", "lost"] }\n\n'
        f"[providers.{provider}]\n{body}\n"
    )


def instances(client: Any, provider: str = "cloud") -> list[dict[str, Any]]:
    got = client("ec2").describe_instances(
        Filters=[{"Name": "tag:stowplan:provider", "Values": [provider]}]
    )
    return [i for r in got["Reservations"] for i in r["Instances"]]


def running(client: Any, provider: str = "cloud") -> list[str]:
    return [
        str(i["InstanceId"])
        for i in instances(client, provider)
        if i["State"]["Name"] in ("pending", "running")
    ]


class FakeImds:
    """IMDSv2 on the loopback, one base URL per instance (``base(iid)``): ``PUT
    /latest/api/token`` gives a token; ``GET /latest/meta-data/spot/instance-action`` with it
    answers 404 until ``notice(iid)``, then EC2's notice (``{"action": "terminate", ...}``).
    A request without a valid token is refused (401), as IMDSv2 does."""

    TOKEN = "stowplan-fake-imds-token"

    def __init__(self) -> None:
        self.notices: set[str] = set()
        self.asked: Counter[str] = Counter()
        """instance -> spot/instance-action requests with a valid token"""
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return None

            def _answer(self, status: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                if self.path.endswith("/latest/api/token") and self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                ):
                    self._answer(200, FakeImds.TOKEN)
                else:
                    self._answer(400)

            def do_GET(self) -> None:
                iid, _, rest = self.path.lstrip("/").partition("/")
                if self.headers.get("X-aws-ec2-metadata-token") != FakeImds.TOKEN:
                    self._answer(401)
                elif rest != "latest/meta-data/spot/instance-action":
                    self._answer(404)
                else:
                    imds.asked[iid] += 1
                    if iid in imds.notices:
                        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
                        self._answer(200, json.dumps({"action": "terminate", "time": when}))
                    else:
                        self._answer(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def base(self, iid: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{iid}"

    def notice(self, iid: str) -> None:
        """EC2 posts the two-minute spot interruption notice for ``iid``."""
        self.notices.add(iid)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Fleet:
    """Boots every instance of ``provider`` moto shows live: its agent runs locally, with the
    interpreter running the tests first on PATH (the AMI's Python)."""

    def __init__(
        self,
        root: Path,
        client: Any,
        moto_url: str,
        provider: str = "cloud",
        *,
        poll: float = 0.2,
        on_start: Callable[[str, Path], None] | None = None,
    ) -> None:
        self.root = root
        self.client = client
        self.moto_url = moto_url
        self.provider = provider
        self.poll = poll
        self.on_start = on_start
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._lock = threading.Lock()
        self.imds = FakeImds()

    def __enter__(self) -> Fleet:
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        with self._lock:
            for iid in list(self.agents):
                self.kill(iid)
        self.imds.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                live = running(self.client, self.provider)
                for iid in live:
                    if iid not in self.agents:
                        self._start(iid)
            except Exception as e:  # reported by check()
                self.errors.append(e)
            self._stop.wait(self.poll)

    def check(self) -> None:
        if self.errors:
            raise AssertionError(f"the fleet harness failed: {self.errors[0]!r}")

    def _start(self, iid: str) -> None:
        got = self.client("ec2").describe_instance_attribute(InstanceId=iid, Attribute="userData")
        home = self.root / iid
        home.mkdir(parents=True, exist_ok=True)
        script = home / "user-data.sh"
        script.write_bytes(base64.b64decode(got["UserData"]["Value"]))
        halt = home / "halt"
        terminate = (
            f"import boto3; boto3.client('ec2', endpoint_url={self.moto_url!r}, "
            "region_name='us-east-1', aws_access_key_id='testing', "
            f"aws_secret_access_key='testing').terminate_instances(InstanceIds=[{iid!r}])"
        )
        halt.write_text(
            f"#!/bin/sh\necho {iid} >> {self.root / 'halted'}\n"
            f'exec {sys.executable} -c "{terminate}"\n'
        )
        halt.chmod(0o755)
        env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(home),
            "STOWPLAN_ROOT": str(home / "root"),
            "STOWPLAN_HALT": str(halt),
            "STOWPLAN_POLL": "0.2",
            "STOWPLAN_IMDS": self.imds.base(iid),
        }
        with self._lock:
            self.agents[iid] = subprocess.Popen(
                ["bash", str(script)],
                env=env,
                stdout=(home / "agent.out").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self.on_start is not None:
            self.on_start(iid, home)

    def kill(self, iid: str) -> None:
        """The machine is gone: its agent and every attempt it started (each a session of
        its own under the agent's root) die with it."""
        proc = self.agents.get(iid)
        if proc is None:
            return
        victims = {proc.pid}
        root = self.root / iid / "root"
        for pid in _pids():
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if cwd.startswith(str(root)):
                victims.add(pid)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        proc.wait(30)

    def reclaim(self, iid: str) -> None:
        """A spot reclaim: the instance is terminated with the spot state reason, and its
        processes die with it."""
        reclaim(self.client, iid)
        self.kill(iid)

    def wait_all_down(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not running(self.client, self.provider):
                return
            time.sleep(0.2)
        raise AssertionError(f"instances still running: {running(self.client, self.provider)}")


def reclaim(client: Any, iid: str) -> None:
    """EC2 reclaims the spot instance ``iid``: terminated, ``StateReason``
    ``Server.SpotInstanceTermination``. moto's API cannot say why an instance ends, so its
    backend (in this process: the test server is threaded) is told as EC2 would set it."""
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.instances import StateReason

    client("ec2").terminate_instances(InstanceIds=[iid])
    inst = ec2_backends[MOTO_ACCOUNT]["us-east-1"].get_instance(iid)
    inst.state_reason = StateReason(
        "Server.SpotInstanceTermination: Spot instance termination",
        "Server.SpotInstanceTermination",
    )


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]
