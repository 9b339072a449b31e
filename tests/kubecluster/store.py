"""The emulated cluster's state: objects, resourceVersions, uids, the event history that watches
resume from, and a virtual clock.

Theory of operation (invariants):

- Every write goes through :meth:`Store.commit`, which takes the next value of one cluster-wide
  counter as the object's ``metadata.resourceVersion`` and appends one event to the history. So
  resourceVersions are unique, increase with every write, and are comparable across resources,
  which is what etcd gives the real API server. Clients must still treat them as opaque strings:
  https://kubernetes.io/docs/reference/using-api/api-concepts/#resource-versions
- The history is bounded (``history_limit`` events, or cut by :meth:`Store.compact`). A watch
  may resume from any resourceVersion at or after ``compacted_rv``; an older one is answered with
  410 Gone, as upstream does once etcd compacted it:
  https://kubernetes.io/docs/reference/using-api/api-concepts/#410-gone-responses
- All state lives on the server's event loop thread; nothing here locks.
- Deleted objects leave a tombstone (the final state) that the controllers consume, the way the
  upstream controllers see the last state of a deleted object through their informers.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from .apimachinery import JSON, rfc3339


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


# https://kubernetes.io/docs/reference/kubernetes-api/ : the resources a batch driver touches
RESOURCES: dict[tuple[str, str], ResourceType] = {
    (r.group, r.plural): r
    for r in (
        ResourceType("", "v1", "namespaces", "Namespace", False, ("status",)),
        ResourceType("", "v1", "nodes", "Node", False, ("status",)),
        ResourceType("", "v1", "pods", "Pod", True, ("status", "log")),
        ResourceType("", "v1", "configmaps", "ConfigMap", True),
        ResourceType("", "v1", "secrets", "Secret", True),
        ResourceType("", "v1", "events", "Event", True),
        ResourceType("batch", "v1", "jobs", "Job", True, ("status",)),
    )
}

Key = tuple[str, str, str, str]  # group, plural, namespace ("" for cluster-scoped), name


@dataclass
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    res: ResourceType
    obj: JSON
    prev: JSON | None


class Clock:
    """Wall time plus an offset the tests advance (deadlines, backoff, taint eviction)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


class Store:
    def __init__(self, clock: Clock, history_limit: int = 2000) -> None:
        self.clock = clock
        self.history_limit = history_limit
        self.rv = 0
        self.compacted_rv = 0
        self.objects: dict[Key, JSON] = {}
        self.history: deque[Event] = deque()
        self.tombstones: dict[str, JSON] = {}  # uid -> final state
        self.logs: dict[tuple[str, str, str], list[str]] = {}  # (ns, pod, container) -> lines
        self._changed = asyncio.Event()
        self.writes = 0

    # -- reading --

    @staticmethod
    def key(res: ResourceType, namespace: str | None, name: str) -> Key:
        return (res.group, res.plural, namespace or "" if res.namespaced else "", name)

    def get(self, res: ResourceType, namespace: str | None, name: str) -> JSON | None:
        return self.objects.get(self.key(res, namespace, name))

    def all(self, res: ResourceType, namespace: str | None = None) -> list[JSON]:
        out = [
            obj
            for (g, p, ns, _), obj in self.objects.items()
            if g == res.group and p == res.plural and (namespace is None or ns == namespace)
        ]
        return sorted(
            out, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        )

    def by_uid(self, uid: str) -> JSON | None:
        for obj in self.objects.values():
            if obj["metadata"].get("uid") == uid:
                return obj
        return None

    def change_event(self) -> asyncio.Event:
        """An event set by the next commit (or :meth:`poke`); take it before waiting."""
        return self._changed

    def poke(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    # -- writing --

    def new_object_metadata(self, obj: JSON, res: ResourceType, namespace: str | None) -> None:
        meta = obj.setdefault("metadata", {})
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = rfc3339(self.clock.now())
        meta.setdefault("generation", 1)
        if res.namespaced:
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        obj["apiVersion"] = res.api_version
        obj["kind"] = res.kind

    def commit(self, res: ResourceType, obj: JSON, event_type: str) -> JSON:
        """Store ``obj`` (or remove it for DELETED) under a new resourceVersion."""
        self.rv += 1
        self.writes += 1
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self.rv)
        k = self.key(res, meta.get("namespace"), meta["name"])
        prev = self.objects.get(k)
        if event_type == "DELETED":
            self.objects.pop(k, None)
            self.tombstones[meta["uid"]] = obj
            if res.plural == "pods":
                for lk in [
                    lk for lk in self.logs if lk[:2] == (meta.get("namespace"), meta["name"])
                ]:
                    del self.logs[lk]
        else:
            self.objects[k] = obj
        self.history.append(Event(self.rv, event_type, res, obj, prev))
        while len(self.history) > self.history_limit:
            self.compacted_rv = self.history.popleft().rv
        self.poke()
        return obj

    def compact(self) -> None:
        """Forget every event so far, as an etcd compaction does: older watches get 410."""
        self.history.clear()
        self.compacted_rv = self.rv

    def reset(self) -> None:
        """Drop every object; the counter goes on, so old resourceVersions are all too old."""
        self.objects.clear()
        self.tombstones.clear()
        self.logs.clear()
        self.rv += 1  # burn one: every resourceVersion from before the reset is too old
        self.compact()
        self.poke()

    def events_after(self, rv: int) -> list[Event]:
        return [e for e in self.history if e.rv > rv]


def dump(obj: Any) -> Any:
    return copy.deepcopy(obj)
