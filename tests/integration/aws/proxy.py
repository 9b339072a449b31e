"""A thin HTTP proxy in front of moto's server that can lose answers: it forwards a request,
lets moto act on it, and then closes the connection without answering (what a client sees when
a network drops after the server acted). It can also answer ``RunInstances`` in a zone with
EC2's ``InsufficientInstanceCapacity``, answer Service Quotas' ``GetServiceQuota`` for EC2's
vCPU quotas (moto's Service Quotas knows only VPC's: without ``quotas`` it answers
``NoSuchResourceException``, as for a region or service without them), and counts the API
calls it forwards (``seen``) apart from the instances' presigned-URL requests
(``presigned``). Faults are injected here, at the HTTP boundary, never by patching the
driver."""

from __future__ import annotations

import http.client
import json
import re
import threading
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import urlsplit


class Lease(NamedTuple):
    """Credentials an ``AssumeRole`` answer carried."""

    access_key: str
    secret_key: str
    token: str


class LossyProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.lose: list[str] = []
        """Actions (``RunInstances``) or S3 requests (``PUT queue``: the method and the kind
        of object, the path's third part: ``queue``, ``agents``, ...) whose answers to lose,
        in order: the next request of the first one loses its answer, then the next of the
        second after it, and so on."""
        self.no_capacity_zones: set[str] = set()
        """Zones where ``RunInstances`` is answered ``InsufficientInstanceCapacity`` (EC2's
        error answer; moto never sees the call)."""
        self.first_zone_runs_out = False
        """Set: the zone of the next ``RunInstances`` runs out of capacity (is added to
        ``no_capacity_zones``) before it is answered."""
        self.refused: list[str] = []
        """Zones of the ``RunInstances`` refused, in order."""
        self.quotas: dict[str, float] | None = None
        """EC2 quota code -> its value, answered to ``GetServiceQuota`` (a code not here:
        ``NoSuchResourceException``); None: the call goes to moto."""
        self.quota_error: str | None = None
        """An error code (``AccessDeniedException``) every ``GetServiceQuota`` is answered."""
        self._lock = threading.Lock()
        self.seen: list[str] = []
        self.presigned = 0
        """Requests through presigned URLs (the instances' own), not counted in ``seen``."""
        self.signed_by: list[tuple[str, str]] = []
        """(what ``seen`` calls it, the access key id that signed it), per API call."""
        self.leases: list[Lease] = []
        """The credentials of each ``AssumeRole`` answer, in order."""
        self.sts_ahead_s = 0.0
        """Seconds added to the ``Expiration`` of ``AssumeRole`` answers: STS's clock as far
        ahead as a test moved the driver's."""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action = zone = ""
                for part in body.decode("latin-1").split("&"):
                    if part.startswith("Action="):
                        action = part[len("Action=") :]
                    elif part.startswith("Placement.AvailabilityZone="):
                        zone = part.split("=", 1)[1]
                target = self.headers.get("X-Amz-Target") or ""
                if not action and "." in target:  # a JSON protocol (Service Quotas)
                    action = target.rsplit(".", 1)[1]
                with proxy._lock:
                    if "X-Amz-Signature=" in self.path:
                        proxy.presigned += 1
                    else:
                        proxy.seen.append(action or f"{self.command} {self.path.split('?')[0]}")
                        signer = re.search(
                            r"Credential=([^/,\s]+)/", self.headers.get("Authorization") or ""
                        )
                        proxy.signed_by.append((proxy.seen[-1], signer[1] if signer else ""))
                    if action == "RunInstances" and proxy.first_zone_runs_out:
                        proxy.first_zone_runs_out = False
                        proxy.no_capacity_zones.add(zone)
                    refuse = action == "RunInstances" and zone in proxy.no_capacity_zones
                    if refuse:
                        proxy.refused.append(zone)
                if action == "GetServiceQuota" and (
                    proxy.quotas is not None or proxy.quota_error is not None
                ):
                    self._quota(json.loads(body or b"{}"))
                    return
                if refuse:
                    self._error(
                        500,
                        "InsufficientInstanceCapacity",
                        f"We currently do not have sufficient capacity in the Availability "
                        f"Zone you requested ({zone}).",
                    )
                    return
                conn = http.client.HTTPConnection(
                    proxy.upstream.hostname or "127.0.0.1", proxy.upstream.port, timeout=30
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{proxy.upstream.hostname}:{proxy.upstream.port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                parts = self.path.split("?")[0].strip("/").split("/")
                label = action or f"{self.command} {parts[2] if len(parts) > 2 else ''}"
                if action == "AssumeRole" and answer.status == 200:
                    text = data.decode()
                    if proxy.sts_ahead_s:
                        text = re.sub(
                            "<Expiration>([^<]+)</Expiration>",
                            lambda m: (
                                "<Expiration>"
                                + (
                                    datetime.fromisoformat(m[1])
                                    + timedelta(seconds=proxy.sts_ahead_s)
                                ).isoformat()
                                + "</Expiration>"
                            ),
                            text,
                        )
                        data = text.encode()
                    got = {
                        k: re.search(f"<{k}>([^<]+)</{k}>", text)
                        for k in ("AccessKeyId", "SecretAccessKey", "SessionToken")
                    }
                    with proxy._lock:
                        proxy.leases.append(Lease(*(m[1] if m else "" for m in got.values())))
                with proxy._lock:
                    lose = bool(proxy.lose) and proxy.lose[0] == label
                    if lose:
                        proxy.lose.pop(0)
                if lose:
                    self.close_connection = True
                    return  # moto acted; the client never hears of it
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body, but its Content-Length is the object's size
                head = answer.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", head or str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _quota(self, asked: dict[str, str]) -> None:
                code = str(asked.get("QuotaCode"))
                value = (proxy.quotas or {}).get(code)
                doc: dict[str, object]
                if (
                    proxy.quota_error is not None
                    or value is None
                    or asked.get("ServiceCode") != "ec2"
                ):
                    status, doc = (
                        400,
                        {
                            "__type": proxy.quota_error or "NoSuchResourceException",
                            "message": "refused by the test proxy",
                        },
                    )
                else:
                    status, doc = (
                        200,
                        {
                            "Quota": {
                                "ServiceCode": "ec2",
                                "QuotaCode": code,
                                "QuotaArn": f"arn:aws:servicequotas:us-east-1::ec2/{code}",
                                "Value": value,
                                "Unit": "None",
                                "Adjustable": True,
                                "GlobalQuota": False,
                            }
                        },
                    )
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, code: str, message: str) -> None:
                data = (
                    '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
                    f"<Code>{code}</Code><Message>{message}</Message></Error></Errors>"
                    "<RequestID>stowplan-proxy</RequestID></Response>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        port = self.server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def __enter__(self) -> LossyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
