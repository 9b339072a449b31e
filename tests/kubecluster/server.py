"""The HTTP face of the emulated cluster and :class:`KubeCluster`, the object tests hold:
start/stop/restart, the kubeconfig, and the controls that drive pods, nodes, faults and time.

The HTTP server is kmock's (PyPI ``kmock``, https://github.com/nolar/kmock): a ``kmock.Server``
(its aiohttp server on 127.0.0.1) serving a ``kmock.RawHandler``. The handler has one reaction,
registered with kmock's DSL as ``handler << callback`` (kmock's docs: "Responses", callables as
payloads), which takes every request and answers it through this module's verb dispatch onto
the emulator: a ``kmock.Response`` with the status, the headers (``Retry-After``, ``Warning``)
and either a JSON body or, for watches and followed logs, an async generator that kmock sends
as a chunked stream that stays open (kmock's docs: "Streams").

Theory of operation: the server, the store and the controllers live on one event loop in a
background thread, so a test's own loop (and the driver's kubernetes-asyncio client on it)
talks to the cluster only over real HTTP. Every control is marshalled onto that loop and
returns when done. Requests are authenticated with the kubeconfig's bearer token, which is
never logged or recorded (the request log keeps method, path, query and status only).

Protocol references:
https://kubernetes.io/docs/reference/using-api/api-concepts/ (verbs, watch, bookmarks, 410)
https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#read-log-read-log-of-the-specified-pod
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import json
import logging
import secrets
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import kmock
import yaml
from aiohttp import test_utils, web

# kmock imports Response into its package (kmock/__init__.py) but leaves it out of __all__
from kmock import Response  # type: ignore[attr-defined]

from . import kubelet
from .apimachinery import (
    JSON,
    ApiError,
    bad_request,
    fields_match,
    labels_match,
    parse_field_selector,
    parse_label_selector,
    rfc3339,
    status_object,
)
from .controllers import Controllers
from .emulator import NODES, PODS, Emulator
from .kubelet import PodOutcome
from .store import RESOURCES, Event, ResourceType

log = logging.getLogger("tests.kubecluster")
T = TypeVar("T")

REASONS = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}


@dataclass(frozen=True)
class RequestRecord:
    """One request as the harness recorded it (never headers)."""

    method: str
    path: str
    query: str
    status: int
    verb: str


@dataclass
class Fault:
    kind: Literal["status", "drop_before", "drop_after"]
    count: int
    status: int = 503
    retry_after: int | None = None
    method: str | None = None
    path_contains: str | None = None

    def matches(self, request: kmock.Request) -> bool:
        if self.method and _method(request) != self.method.upper():
            return False
        return not (self.path_contains and self.path_contains not in request.url.path_qs)


@dataclass
class NodeSpec:
    """A node as a test declares it; rendered with the labels real clusters set
    (https://kubernetes.io/docs/reference/labels-annotations-taints/, GKE's node-pool label,
    NVIDIA GPU feature discovery's ``nvidia.com/gpu.product``)."""

    name: str
    cpu: str = "8"
    memory: str = "32Gi"
    gpus: int = 0
    gpu_product: str | None = None
    allocatable_gpus: int | None = None  # default: gpus (0 models a broken device plugin)
    gpu_replicas: int = 1
    """above 1: the device plugin time-slices each GPU into this many replicas, and GPU feature
    discovery labels the node so (NVIDIA/k8s-device-plugin, docs/gpu-feature-discovery/
    README.md): ``nvidia.com/gpu.replicas``, the product with ``-SHARED``; the node's
    capacity and allocatable ``nvidia.com/gpu`` are replicas, ``nvidia.com/gpu.count`` the
    GPUs."""
    pool: str | None = None
    pool_label: str = "cloud.google.com/gke-nodepool"
    region: str | None = None
    zone: str | None = None
    instance_type: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[JSON] = field(default_factory=list)
    unschedulable: bool = False
    ready: bool = True
    pods: int = 110

    def render(self) -> JSON:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }
        if self.pool:
            labels[self.pool_label] = self.pool
        if self.gpu_product:
            shared = "-SHARED" if self.gpu_replicas > 1 else ""
            labels["nvidia.com/gpu.product"] = self.gpu_product + shared
            labels["nvidia.com/gpu.count"] = str(self.gpus)
            labels["nvidia.com/gpu.replicas"] = str(self.gpu_replicas)
        if self.region:
            labels["topology.kubernetes.io/region"] = self.region
        if self.zone:
            labels["topology.kubernetes.io/zone"] = self.zone
        if self.instance_type:
            labels["node.kubernetes.io/instance-type"] = self.instance_type
        labels.update(self.labels)
        capacity = {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": str(self.pods),
            "ephemeral-storage": "100Gi",
        }
        allocatable = dict(capacity)
        if self.gpus or self.gpu_product:
            capacity["nvidia.com/gpu"] = str(self.gpus * self.gpu_replicas)
            allocatable["nvidia.com/gpu"] = str(
                self.gpus * self.gpu_replicas
                if self.allocatable_gpus is None
                else self.allocatable_gpus
            )
        spec: JSON = {}
        if self.taints:
            spec["taints"] = [dict(t) for t in self.taints]
        if self.unschedulable:
            spec["unschedulable"] = True
        return {
            "metadata": {"name": self.name, "labels": labels},
            "spec": spec,
            "status": {
                "capacity": capacity,
                "allocatable": allocatable,
                "conditions": [
                    {"type": t, "status": "False", "reason": f"KubeletHas{r}", "message": m}
                    for t, r, m in (
                        (
                            "MemoryPressure",
                            "SufficientMemory",
                            "kubelet has sufficient memory available",
                        ),
                        ("DiskPressure", "NoDiskPressure", "kubelet has no disk pressure"),
                        ("PIDPressure", "SufficientPID", "kubelet has sufficient PID available"),
                    )
                ]
                + [ready_condition(self.ready)],
                "nodeInfo": {
                    "kubeletVersion": "v1.33.0",
                    "kubeProxyVersion": "v1.33.0",
                    "containerRuntimeVersion": "emulated://1",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "osImage": "emulated",
                    "kernelVersion": "6.1.0",
                    "bootID": self.name,
                    "machineID": self.name,
                    "systemUUID": self.name,
                },
            },
        }


def ready_condition(ready: bool | None) -> JSON:
    # https://kubernetes.io/docs/reference/node/node-status/#condition
    if ready is True:
        value, reason, message = "True", "KubeletReady", "kubelet is posting ready status"
    elif ready is False:
        value, reason, message = "False", "KubeletNotReady", "container runtime network not ready"
    else:
        value, reason, message = (
            "Unknown",
            "NodeStatusUnknown",
            "Kubelet stopped posting node status.",
        )
    return {"type": "Ready", "status": value, "reason": reason, "message": message}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _is_true(v: str | None) -> bool:
    return (v or "").lower() in ("1", "true")


def _method(request: kmock.Request) -> str:
    return str(request.method.value).upper()


def _header(request: kmock.Request, name: str) -> str:
    """A request header, case-insensitively (kmock keeps them as a plain dict)."""
    for k, v in request.headers.items():
        if k.lower() == name.lower():
            return v
    return ""


def _abort(request: kmock.Request) -> None:
    """Close the request's connection without an answer (a dropped network path). kmock's
    parsed request keeps the aiohttp request it came from; only its transport is used."""
    raw = request._raw_request
    if raw is not None and raw.transport is not None:
        raw.transport.abort()


class _WebServer(web.Server):
    """aiohttp's low-level server, taking request bodies up to 8 MiB (its default is 1 MiB;
    kube-apiserver takes 3 MB)."""

    def _make_request(
        self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any
    ) -> web.BaseRequest:
        return web.BaseRequest(
            message, payload, protocol, writer, task, self._loop, client_max_size=8 * 1024 * 1024
        )


class _HttpServer(test_utils.RawTestServer):
    """kmock.Server's default aiohttp server class, with the access log off (every request
    would be logged at INFO) and a short shutdown grace, as a restarted apiserver has."""

    async def _make_runner(self, debug: bool = True, **kwargs: Any) -> web.ServerRunner:
        srv = _WebServer(self._handler, loop=self._loop, access_log=None, **kwargs)
        return web.ServerRunner(srv, shutdown_timeout=0.5, **kwargs)


Stream = AsyncIterator[bytes]


class ApiServer:
    """The aiohttp application; lives on the cluster's loop."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        self.stopping = asyncio.Event()
        self.close_streams = asyncio.Event()
        self.close_generation = 0
        """bumped by every ``close_watches``: a watch that began before it ends, even one that
        had not reached its wait yet when the event was set."""
        self.bookmark_now = asyncio.Event()
        self.handler: kmock.RawHandler | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._header_names: set[str] = {"Content-Type"}

    @property
    def emu(self) -> Emulator:
        return self.cluster.emulator

    async def start(self, port: int) -> None:
        handler = kmock.RawHandler()
        # kmock's catch-all reaction: no filter, a callable payload called with each request
        handler << self.handle
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(handler)
            await stack.enter_async_context(
                kmock.Server(handler, host="127.0.0.1", port=port, server_cls=_HttpServer)
            )
            self._stack = stack.pop_all()
        self.handler = handler

    async def stop(self) -> None:
        self.stopping.set()
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None

    def errors(self) -> list[Exception]:
        """What kmock caught while rendering an answer (a harness bug, never an API error)."""
        if self.handler is None or not self.handler.active:
            return []
        return list(self.handler.errors)

    def reply(
        self,
        status: int,
        payload: JSON | bytes | Stream,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """An answer for kmock to render: a dict as JSON, bytes as they are, an async
        generator as a chunked stream. kmock merges each answer's headers into its reaction,
        so every header name ever used is named here, unset (None) where this answer has none."""
        headers = dict(headers or {})
        self._header_names.update(headers)
        return Response(
            status=status,
            payload=payload,
            headers={n: headers.get(n) for n in self._header_names},
        )

    # -- request handling --

    async def handle(self, request: kmock.Request) -> Response:
        """kmock's reaction: every request arrives here (see the module notes)."""
        verb = "?"
        status = 0
        streaming = False
        try:
            fault = self.cluster.take_fault(request)
            if fault is not None and fault.kind == "drop_before":
                status = -1
                return self._drop(request)
            if fault is not None and fault.kind == "status":
                err = ApiError(
                    fault.status,
                    REASONS.get(fault.status, "InternalError"),
                    f"injected {fault.status} by the test harness",
                    {"retryAfterSeconds": fault.retry_after}
                    if fault.retry_after is not None
                    else None,
                    {"Retry-After": str(fault.retry_after)}
                    if fault.retry_after is not None
                    else None,
                )
                raise err
            auth = _header(request, "Authorization")
            if auth != f"Bearer {self.cluster.token}":
                log.info(
                    "kubecluster: 401 for %s %s (bad or missing bearer token)",
                    _method(request),
                    request.url.path,
                )
                raise ApiError(401, "Unauthorized", "Unauthorized")
            verb, response = await self.dispatch(request)
            if fault is not None and fault.kind == "drop_after":
                status = -1
                return self._drop(request)
            status = response.status or 200
            if isinstance(response.payload, AsyncIterator):
                # a stream is recorded when it ends, as an answer is when it is sent
                streaming = True
                response = Response(
                    status=response.status,
                    headers=response.headers,
                    payload=self._recorded(request, verb, response.payload),
                )
            return response
        except ApiError as e:
            status = e.code
            return self.reply(e.code, e.status(), e.headers)
        except Exception as e:  # a harness bug: answer 500 and keep it for the test to see
            log.exception("kubecluster: handler failed")
            self.cluster.controllers.errors.append(e)
            status = 500
            return self.reply(500, status_object(500, "InternalError", repr(e)))
        finally:
            if not streaming:
                self._record(request, verb, status)

    def _record(self, request: kmock.Request, verb: str, status: int) -> None:
        url = request.url
        rec = RequestRecord(_method(request), url.path, url.query_string, status, verb)
        self.cluster.requests.append(rec)
        log.debug("kubecluster: %s %s?%s -> %s", rec.method, rec.path, rec.query, rec.status)

    async def _recorded(self, request: kmock.Request, verb: str, stream: Stream) -> Stream:
        """The stream, recorded in the request log when it ends; a harness bug in it is kept
        for the test to see and ends the stream. Its first chunk is empty, so that kmock sends
        the headers at once (as kmock's own emulator's watch does) rather than with the first
        event; it also keeps kmock from taking a stream that ends with no chunk for a depleted
        reaction (kmock would then disable the reaction and answer no later request)."""
        status = 200
        yield b""
        try:
            async for chunk in stream:
                yield chunk
        except Exception as e:
            log.exception("kubecluster: stream failed")
            self.cluster.controllers.errors.append(e)
            status = 500
        finally:
            self._record(request, verb, status)

    def _drop(self, request: kmock.Request) -> Response:
        """Close the connection without an answer, as a dropped network path would."""
        _abort(request)
        log.info("kubecluster: dropped the connection of %s %s", _method(request), request.url.path)
        return self.reply(499, b"")

    async def dispatch(self, request: kmock.Request) -> tuple[str, Response]:
        parts = [p for p in request.url.path.split("/") if p]
        q = request.url.query
        if not parts:
            return "discovery", self.reply(
                200,
                {
                    "paths": [
                        "/api",
                        "/api/v1",
                        "/apis",
                        "/apis/batch",
                        "/apis/batch/v1",
                        "/version",
                    ]
                },
            )
        if parts == ["version"]:
            return "discovery", self.reply(
                200,
                {
                    "major": "1",
                    "minor": "33",
                    "gitVersion": "v1.33.0-kubecluster",
                    "platform": "linux/amd64",
                },
            )
        disc = self.discovery(parts)
        if disc is not None:
            return "discovery", self.reply(200, disc)
        res, ns, name, sub = self.route(parts)
        method = _method(request)
        if name is None:
            if method == "GET" and _is_true(q.get("watch")):
                return "watch", self.reply(
                    200, self.watch(request, res, ns), {"Content-Type": "application/json"}
                )
            if method == "GET":
                return "list", self.reply(200, self.list(res, ns, q))
            if method == "POST":
                body = self._body(request)
                obj = self.emu.create(res, ns, body, dry_run=q.get("dryRun") == "All")
                return "create", self.reply(201, obj)
            if method == "DELETE":
                return "deletecollection", self.reply(200, self.delete_collection(request, res, ns))
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        if sub == "log":
            if res.plural != "pods" or method != "GET":
                raise ApiError(405, "MethodNotAllowed", "log is read-only")
            return "log", self.pod_log(request, ns, name)
        if sub not in (None, "status"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if method == "GET":
            return "get", self.reply(200, self.emu.get(res, ns, name))
        if method == "PUT":
            return "update", self.reply(
                200, self.emu.replace(res, ns, name, self._body(request), sub)
            )
        if method == "PATCH":
            ctype = _header(request, "Content-Type")
            return "patch", self.reply(
                200, self.emu.patch(res, ns, name, self._body(request, any_json=True), ctype, sub)
            )
        if method == "DELETE":
            opts = self._body(request, optional=True)
            policy = q.get("propagationPolicy") or opts.get("propagationPolicy")
            if opts.get("orphanDependents") is not None and policy is None:
                policy = "Orphan" if opts["orphanDependents"] else "Background"
            obj, code, warning = self.emu.delete(res, ns, name, policy, opts.get("preconditions"))
            headers = {"Warning": warning} if warning else None
            return "delete", self.reply(code, obj, headers)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")

    @staticmethod
    def _body(request: kmock.Request, *, optional: bool = False, any_json: bool = False) -> Any:
        raw = request.body  # kmock has read the whole body before its reactions run
        if not raw:
            if optional:
                return {}
            raise bad_request("the body of the request is empty")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise bad_request(f"the body of the request was in an unknown format: {e}") from e
        if not any_json and not isinstance(body, dict):
            raise bad_request("the body of the request must be an object")
        return body

    def discovery(self, parts: list[str]) -> JSON | None:
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"]}
        if parts == ["apis"]:
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": "batch",
                        "versions": [{"groupVersion": "batch/v1", "version": "v1"}],
                        "preferredVersion": {"groupVersion": "batch/v1", "version": "v1"},
                    }
                ],
            }
        if parts in (["api", "v1"], ["apis", "batch", "v1"]):
            group = "" if parts[0] == "api" else "batch"
            resources = []
            for r in RESOURCES.values():
                if r.group != group:
                    continue
                resources.append(
                    {
                        "name": r.plural,
                        "namespaced": r.namespaced,
                        "kind": r.kind,
                        "verbs": [
                            "create",
                            "delete",
                            "deletecollection",
                            "get",
                            "list",
                            "patch",
                            "update",
                            "watch",
                        ],
                    }
                )
                for s in r.subresources:
                    resources.append(
                        {
                            "name": f"{r.plural}/{s}",
                            "namespaced": r.namespaced,
                            "kind": r.kind,
                            "verbs": ["get", "patch", "update"],
                        }
                    )
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": "batch/v1" if group else "v1",
                "resources": resources,
            }
        return None

    @staticmethod
    def route(parts: list[str]) -> tuple[ResourceType, str | None, str | None, str | None]:
        nf = ApiError(404, "NotFound", "the server could not find the requested resource")
        if parts[0] == "api" and len(parts) >= 3 and parts[1] == "v1":
            group, rest = "", parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4 and parts[2] == "v1":
            group, rest = parts[1], parts[3:]
        else:
            raise nf
        ns: str | None = None
        if (
            len(rest) >= 3
            and rest[0] == "namespaces"
            and (group, rest[2]) in RESOURCES
            and RESOURCES[(group, rest[2])].namespaced
        ):
            ns, rest = rest[1], rest[2:]
        res = RESOURCES.get((group, rest[0]))
        if res is None or len(rest) > 3:
            raise nf
        if res.namespaced and ns is None and len(rest) > 1:
            raise nf
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and sub not in res.subresources:
            raise nf
        return res, ns, name, sub

    # -- list and watch --

    def list(self, res: ResourceType, ns: str | None, q: Any) -> JSON:
        items = self.emu.list(res, ns, q.get("labelSelector"), q.get("fieldSelector"))
        rv = q.get("resourceVersion")
        if q.get("resourceVersionMatch") == "Exact" and rv and int(rv) < self.emu.store.rv:
            # the emulator keeps no old snapshots: an exact read of the past is "too old"
            raise ApiError(410, "Expired", f"too old resource version: {rv} ({self.emu.store.rv})")
        meta: JSON = {"resourceVersion": str(self.emu.store.rv)}
        limit = int(q.get("limit") or 0)
        start = 0
        if q.get("continue"):
            try:
                tok = json.loads(bytes.fromhex(q["continue"]))
                start = int(tok["start"])
                if int(tok["rv"]) < self.emu.store.compacted_rv:
                    raise ApiError(
                        410,
                        "Expired",
                        "The provided continue parameter is too old "
                        "to display a consistent list result.",
                    )
            except (ValueError, KeyError) as e:
                raise bad_request("invalid continue token") from e
            meta["resourceVersion"] = str(tok["rv"])
        if limit:
            page = items[start : start + limit]
            if start + limit < len(items):
                meta["continue"] = (
                    json.dumps({"rv": int(meta["resourceVersion"]), "start": start + limit})
                    .encode()
                    .hex()
                )
                meta["remainingItemCount"] = len(items) - start - limit
            items = page
        # list items carry no kind/apiVersion; the list does
        out_items = []
        for o in items:
            o = dict(o)
            o.pop("kind", None)
            o.pop("apiVersion", None)
            out_items.append(o)
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": meta,
            "items": out_items,
        }

    def delete_collection(self, request: kmock.Request, res: ResourceType, ns: str | None) -> JSON:
        q = request.url.query
        opts = self._body(request, optional=True)
        policy = q.get("propagationPolicy") or opts.get("propagationPolicy")
        for o in self.emu.list(res, ns, q.get("labelSelector"), q.get("fieldSelector")):
            with contextlib.suppress(ApiError):
                self.emu.delete(
                    res, ns or o["metadata"].get("namespace"), o["metadata"]["name"], policy
                )
        return status_object(200, "", "")

    def watch(self, request: kmock.Request, res: ResourceType, ns: str | None) -> Stream:
        """The watch stream: JSON lines, one event each, open until the timeout, a close or
        a stop. Its parameters are checked first (a bad one is a 400 answer, not a stream)."""
        q = request.url.query
        store = self.emu.store
        lreq = parse_label_selector(q.get("labelSelector"))
        freq = parse_field_selector(q.get("fieldSelector"))
        bookmarks = _is_true(q.get("allowWatchBookmarks"))
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        initial_events = _is_true(q.get("sendInitialEvents"))
        rv_param = q.get("resourceVersion")
        generation = self.close_generation
        start_now = rv_param in (None, "", "0") or initial_events
        try:
            since = 0 if start_now else int(str(rv_param))
        except ValueError:
            raise bad_request(f"invalid resource version {rv_param!r}") from None

        async def stream() -> Stream:
            def matches(obj: JSON | None) -> bool:
                if obj is None:
                    return False
                if ns is not None and obj["metadata"].get("namespace") != ns:
                    return False
                return labels_match(lreq, obj["metadata"].get("labels") or {}) and fields_match(
                    freq, obj
                )

            def event(kind: str, obj: JSON) -> bytes:
                return json.dumps({"type": kind, "object": obj}).encode() + b"\n"

            def bookmark(rv: int, initial_end: bool = False) -> JSON:
                meta: JSON = {"resourceVersion": str(rv)}
                if initial_end:
                    meta["annotations"] = {"k8s.io/initial-events-end": "true"}
                return {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta}

            try:
                if start_now:
                    # "Get State and Start at Most Recent": synthetic ADDED events first
                    cursor = store.rv
                    for obj in self.emu.list(res, ns):
                        if matches(obj):
                            yield event("ADDED", obj)
                    if initial_events and bookmarks:
                        yield event("BOOKMARK", bookmark(cursor, initial_end=True))
                else:
                    cursor = since
                    if cursor < store.compacted_rv:
                        yield event(
                            "ERROR",
                            status_object(
                                410,
                                "Expired",
                                f"too old resource version: {cursor} ({store.compacted_rv + 1})",
                            ),
                        )
                        return
                    if cursor > store.rv:
                        yield event(
                            "ERROR", status_object(504, "Timeout", "Too large resource version")
                        )
                        return
                loop = asyncio.get_running_loop()
                ends = None if timeout is None else loop.time() + timeout
                next_bookmark = loop.time() + self.cluster.bookmark_interval
                while not self.stopping.is_set():
                    if generation != self.close_generation:
                        _abort(request)
                        return
                    changed = store.change_event()
                    bm_now = self.bookmark_now
                    close = self.close_streams
                    if cursor < store.compacted_rv:
                        yield event(
                            "ERROR",
                            status_object(
                                410,
                                "Expired",
                                f"too old resource version: {cursor} ({store.compacted_rv + 1})",
                            ),
                        )
                        return
                    events = store.events_after(cursor)
                    for e in events:
                        cursor = e.rv
                        if e.res is not res:
                            continue
                        kind = self._translate(e, matches)
                        if kind is not None:
                            yield event(kind, e.obj)
                    cursor = max(cursor, store.rv) if not events else cursor
                    now = loop.time()
                    if bookmarks and (now >= next_bookmark or bm_now.is_set()):
                        yield event("BOOKMARK", bookmark(store.rv))
                        cursor = store.rv
                        next_bookmark = now + self.cluster.bookmark_interval
                    if ends is not None and now >= ends:
                        return
                    waits = [
                        asyncio.ensure_future(ev.wait())
                        for ev in (changed, self.stopping, close, bm_now)
                    ]
                    deadline = (
                        min(
                            x for x in (next_bookmark if bookmarks else None, ends) if x is not None
                        )
                        if (bookmarks or ends)
                        else None
                    )
                    try:
                        await asyncio.wait(
                            waits,
                            timeout=None if deadline is None else max(0.0, deadline - loop.time()),
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    finally:
                        for w in waits:
                            w.cancel()
                    if close.is_set() or generation != self.close_generation:
                        _abort(request)
                        return
            except (ConnectionResetError, ConnectionError):
                return

        return stream()

    @staticmethod
    def _translate(e: Event, matches: Callable[[JSON | None], bool]) -> str | None:
        """A watcher with a selector sees an object enter (ADDED) and leave (DELETED) it."""
        now, before = matches(e.obj), matches(e.prev)
        if e.type == "ADDED":
            return "ADDED" if now else None
        if e.type == "DELETED":
            return "DELETED" if now or before else None
        if now and before:
            return "MODIFIED"
        if now:
            return "ADDED"
        if before:
            return "DELETED"
        return None

    # -- logs --

    def pod_log(self, request: kmock.Request, ns: str | None, name: str) -> Response:
        q = request.url.query
        pod = self.emu.get(PODS, ns, name)
        names = kubelet.container_names(pod)
        container = q.get("container")
        if container is None:
            if len(names) != 1:
                raise bad_request(
                    f"a container name must be specified for pod {name}, choose "
                    f"one of: [{' '.join(names)}]"
                )
            container = names[0]
        elif container not in names:
            raise bad_request(f"container {container} is not valid for pod {name}")
        statuses = {c["name"]: c for c in pod.get("status", {}).get("containerStatuses") or []}
        state = (statuses.get(container) or {}).get("state") or {
            "waiting": {"reason": "ContainerCreating"}
        }
        if "waiting" in state:
            reason = state["waiting"].get("reason", "ContainerCreating")
            text = {
                "ImagePullBackOff": "trying and failing to pull image",
                "ErrImagePull": "trying and failing to pull image",
            }.get(reason, reason)
            raise bad_request(
                f'container "{container}" in pod "{name}" is waiting to start: {text}'
            )
        key = (ns or "", name, container)
        lines = self.emu.store.logs.get(key, [])
        tail = q.get("tailLines")
        start = max(0, len(lines) - int(tail)) if tail else 0
        text_plain = {"Content-Type": "text/plain; charset=utf-8"}
        if not _is_true(q.get("follow")):
            return self.reply(200, "".join(lines[start:]).encode(), text_plain)

        async def stream() -> Stream:
            sent = start
            try:
                while not self.stopping.is_set():
                    changed = self.emu.store.change_event()
                    lines = self.emu.store.logs.get(key, [])
                    for line in lines[sent:]:
                        yield line.encode()
                    sent = len(lines)
                    cur = self.emu.store.get(PODS, ns, name)
                    if (
                        cur is None
                        or kubelet.is_terminal(cur)
                        or cur["metadata"]["uid"] != pod["metadata"]["uid"]
                    ):
                        break
                    waits = [
                        asyncio.ensure_future(e.wait())
                        for e in (changed, self.stopping, self.close_streams)
                    ]
                    try:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waits:
                            w.cancel()
                    if self.close_streams.is_set():
                        break
            except (ConnectionResetError, ConnectionError):
                return

        return self.reply(200, stream(), text_plain)


class KubeCluster:
    """An emulated Kubernetes API server on 127.0.0.1 with its control plane, for tests.

    ``start()`` serves it from a background thread; ``kubeconfig(path)`` writes a kubeconfig
    with token auth for it. The controls below stand in for the kubelets, the nodes and the
    network; they return once their effect is stored (the controllers then react on their own;
    :meth:`settle` waits until they have).
    """

    def __init__(self, *, bookmark_interval: float = 1.0, history_limit: int = 2000) -> None:
        self.token = "kc-test-" + secrets.token_urlsafe(24)
        self.bookmark_interval = bookmark_interval
        self.emulator = Emulator(history_limit=history_limit)
        self.controllers = Controllers(self.emulator)
        self.requests: list[RequestRecord] = []
        self.faults: list[Fault] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: ApiServer | None = None
        self._controller_task: asyncio.Task[None] | None = None

    # -- lifecycle --

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> KubeCluster:
        if self._thread is not None:
            raise RuntimeError("the cluster is already running")
        self.port = port or _free_port()
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="kubecluster", daemon=True)
        self._thread.start()
        self._run(self._astart())
        log.info("kubecluster: serving on %s", self.url)
        return self

    async def _astart(self) -> None:
        self._controller_task = asyncio.ensure_future(self.controllers.run())
        await self._start_server()

    async def _start_server(self) -> None:
        self._server = ApiServer(self)
        await self._server.start(self.port)

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._run(self._astop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None
        self._thread = None
        log.info("kubecluster: stopped")

    async def _astop(self) -> None:
        if self._server is not None:
            await self._server.stop()
        if self._controller_task is not None:
            self._controller_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._controller_task

    def __enter__(self) -> KubeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restart(self, *, keep_state: bool = True) -> None:
        """Stop serving (every open connection and watch ends), then serve again on the same
        port, with the stored objects kept or all dropped (only the system namespaces come
        back; resourceVersions keep increasing, so every earlier one is too old)."""

        async def go() -> None:
            assert self._server is not None
            await self._server.stop()
            if not keep_state:
                self.emulator.store.reset()
                self.emulator.seed_namespaces()
                self.controllers.books.clear()
            await self._start_server()

        self._run(go())
        log.info(
            "kubecluster: restarted on %s (state %s)", self.url, "kept" if keep_state else "reset"
        )

    def kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """A kubeconfig for the cluster with a bearer token (context ``kubecluster``)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kubecluster", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "kubecluster",
                    "context": {"cluster": "kubecluster", "user": "tester", "namespace": namespace},
                }
            ],
            "current-context": "kubecluster",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    # -- marshalling onto the cluster's loop --

    def _run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        if self._loop is None:
            raise RuntimeError("the cluster is not running")
        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    def _call(self, fn: Callable[[], T]) -> T:
        async def go() -> T:
            return fn()

        return self._run(go())

    # -- reading state --

    def get(
        self, plural: str, name: str, namespace: str | None = "default", group: str = ""
    ) -> JSON | None:
        res = RESOURCES[(group, plural)]
        return self._call(lambda: _copy(self.emulator.store.get(res, namespace, name)))

    def objects(
        self,
        plural: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        group: str = "",
    ) -> list[JSON]:
        res = RESOURCES[(group, plural)]
        return self._call(lambda: _copy(self.emulator.list(res, namespace, label_selector)))

    def pods(
        self, namespace: str | None = "default", label_selector: str | None = None
    ) -> list[JSON]:
        return self.objects("pods", namespace, label_selector)

    def job_pods(self, job: str, namespace: str = "default") -> list[JSON]:
        return self.pods(namespace, f"batch.kubernetes.io/job-name={job}")

    def pod_for_index(self, job: str, index: int, namespace: str = "default") -> JSON:
        """The live pod of one completion index of an Indexed Job."""
        pods = [
            p
            for p in self.pods(
                namespace,
                f"batch.kubernetes.io/job-name={job},"
                f"batch.kubernetes.io/job-completion-index={index}",
            )
            if not kubelet.is_terminal(p)
        ]
        if len(pods) != 1:
            raise LookupError(f"job {job} index {index}: {len(pods)} live pods")
        return pods[0]

    @property
    def resource_version(self) -> int:
        return self._call(lambda: self.emulator.store.rv)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until the controllers have reacted to every write so far."""
        self._run(self._asettle(timeout), timeout + 5)

    async def asettle(self, timeout: float = 10.0) -> None:
        """:meth:`settle` for an async test (does not block its loop)."""
        if self._loop is None:
            raise RuntimeError("the cluster is not running")
        fut = asyncio.run_coroutine_threadsafe(self._asettle(timeout), self._loop)
        await asyncio.wrap_future(fut)

    async def _asettle(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        ends = loop.time() + timeout
        while not self.controllers.settled():
            if loop.time() > ends:
                raise TimeoutError(f"the emulated control plane did not settle in {timeout}s")
            await asyncio.sleep(0.002)
        self.raise_errors()

    def raise_errors(self) -> None:
        """Raise the first harness bug: one in the controllers or the verbs, or one that kmock
        caught while rendering an answer (it answers those with a 500 and keeps them)."""
        errors = [*self.controllers.errors, *(self._server.errors() if self._server else [])]
        if errors:
            raise RuntimeError(f"kubecluster internal error: {errors[0]!r}") from errors[0]

    # -- nodes --

    def add_node(self, spec: NodeSpec) -> JSON:
        def go() -> JSON:
            obj = spec.render()
            status = obj.pop("status")
            created = self.emulator.create(NODES, None, obj)
            now = rfc3339(self.emulator.clock.now())
            for c in status["conditions"]:
                c["lastHeartbeatTime"] = c["lastTransitionTime"] = now
            created["status"] = status
            return _copy(self.emulator.write(NODES, created))

        return self._call(go)

    def set_node_ready(self, name: str, ready: bool | None) -> None:
        """Ready True, False (NotReady) or None (Unknown: the node stopped reporting, as when
        it is lost). The node lifecycle taints follow; pods are evicted after their
        tolerationSeconds (300 s by default: see :meth:`advance_clock`)."""

        def go() -> None:
            node = _copy(self.emulator.get(NODES, None, name))
            conds = [c for c in node["status"].get("conditions") or [] if c["type"] != "Ready"]
            cond = ready_condition(ready)
            cond["lastHeartbeatTime"] = cond["lastTransitionTime"] = rfc3339(
                self.emulator.clock.now()
            )
            node["status"]["conditions"] = [*conds, cond]
            self.emulator.write(NODES, node)

        self._call(go)

    def lose_node(self, name: str, *, evict_now: bool = False) -> None:
        """The node stops reporting (Ready Unknown). With ``evict_now`` the clock jumps past
        the default 300 s toleration so its pods are evicted at once."""
        self.set_node_ready(name, None)
        if evict_now:
            self.settle()
            self.advance_clock(301)

    def set_node_unschedulable(self, name: str, unschedulable: bool = True) -> None:
        def go() -> None:
            node = _copy(self.emulator.get(NODES, None, name))
            node["spec"]["unschedulable"] = unschedulable
            self.emulator.write(NODES, node)

        self._call(go)

    # -- pods (the tests' kubelet) --

    def set_pod_behaviour(self, fn: Callable[[JSON], PodOutcome | None] | None) -> None:
        """What happens to each pod as it is scheduled (None: it stays Pending for the test to
        drive by hand)."""
        self.controllers.behaviour = fn

    def drive_pod(self, name: str, outcome: PodOutcome, namespace: str = "default") -> None:
        """Make ``outcome`` happen to a scheduled pod now."""

        def go() -> None:
            pod = self.emulator.get(PODS, namespace, name)
            if not pod["spec"].get("nodeName"):
                raise RuntimeError(
                    f"pod {namespace}/{name} is not scheduled; a kubelet cannot run it"
                )
            self.controllers.apply(_copy(pod), outcome)

        self._call(go)

    def run_pod(self, name: str, namespace: str = "default") -> None:
        self.drive_pod(name, PodOutcome("run"), namespace)

    def succeed_pod(self, name: str, exit_code: int = 0, namespace: str = "default") -> None:
        self.drive_pod(name, PodOutcome("succeed", exit_code=exit_code), namespace)

    def fail_pod(self, name: str, exit_code: int = 1, namespace: str = "default") -> None:
        self.drive_pod(name, PodOutcome("fail", exit_code=exit_code), namespace)

    def oom_kill_pod(self, name: str, namespace: str = "default") -> None:
        self.drive_pod(name, PodOutcome("oom"), namespace)

    def evict_pod(
        self, name: str, reason: str = "EvictionByEvictionAPI", namespace: str = "default"
    ) -> None:
        self.drive_pod(name, PodOutcome("evict", reason=reason), namespace)

    def set_pod_waiting(
        self, name: str, reason: str, message: str = "", namespace: str = "default"
    ) -> None:
        self.drive_pod(name, PodOutcome("wait", reason=reason, message=message), namespace)

    def write_log(
        self, pod: str, text: str, container: str | None = None, namespace: str = "default"
    ) -> None:
        def go() -> None:
            p = self.emulator.get(PODS, namespace, pod)
            c = container or kubelet.container_names(p)[0]
            self.emulator.store.logs.setdefault((namespace, pod, c), []).extend(
                text.splitlines(keepends=True)
            )
            self.emulator.store.poke()

        self._call(go)

    # -- time --

    def advance_clock(self, seconds: float) -> None:
        """Move the emulated clock forward (Job deadlines, pod backoff, taint eviction)."""

        def go() -> None:
            self.emulator.clock.offset += seconds
            self.emulator.store.poke()

        self._call(go)

    def set_pod_backoff(self, base: float, cap: float | None = None) -> None:
        """Override the documented 10 s * 2^n (cap 6 min) pod re-creation backoff."""
        self.controllers.backoff_base = base
        if cap is not None:
            self.controllers.backoff_cap = cap

    # -- faults --

    def inject_errors(
        self,
        status: int,
        count: int,
        *,
        retry_after: int | None = None,
        method: str | None = None,
        path_contains: str | None = None,
    ) -> None:
        """The next ``count`` matching requests get ``status`` (429/500/503/504) with a Status
        body and, if given, a Retry-After header."""
        self._call(
            lambda: self.faults.append(
                Fault("status", count, status, retry_after, method, path_contains)
            )
        )

    def drop_connections(
        self,
        count: int = 1,
        *,
        after_processing: bool = False,
        method: str | None = None,
        path_contains: str | None = None,
    ) -> None:
        """Close the connection of the next ``count`` matching requests without answering:
        before the request takes effect, or (``after_processing``) after it did, so a create
        is stored but its answer is lost."""
        kind: Literal["drop_before", "drop_after"] = (
            "drop_after" if after_processing else "drop_before"
        )
        self._call(
            lambda: self.faults.append(
                Fault(kind, count, method=method, path_contains=path_contains)
            )
        )

    def clear_faults(self) -> None:
        """Forget every fault not yet used up (the network is healthy again)."""
        self._call(self.faults.clear)

    def take_fault(self, request: kmock.Request) -> Fault | None:
        for f in self.faults:
            if f.count > 0 and f.matches(request):
                f.count -= 1
                if f.count == 0:
                    self.faults.remove(f)
                return f
        return None

    def close_watches(self) -> None:
        """Cut every open watch and log stream (the connection drops)."""

        def go() -> None:
            assert self._server is not None
            self._server.close_generation += 1
            self._server.close_streams.set()
            self._server.close_streams = asyncio.Event()

        self._call(go)

    def send_bookmarks(self) -> None:
        """Every watch that allows bookmarks gets one now."""

        def go() -> None:
            assert self._server is not None
            ev = self._server.bookmark_now
            self._server.bookmark_now = asyncio.Event()
            ev.set()

        self._call(go)

    def compact(self) -> None:
        """Forget the event history: a watch resuming from any earlier resourceVersion gets
        410 Gone (as after an etcd compaction)."""
        self._call(self.emulator.store.compact)


def _copy(obj: T) -> T:
    return copy.deepcopy(obj)
