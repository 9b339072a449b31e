"""The API verbs over the store: create, get, list, replace, patch, delete (with propagation).

The HTTP layer (``server.py``) translates requests into these calls; the controllers call them
for their own writes. Semantics follow
https://kubernetes.io/docs/reference/using-api/api-concepts/ and, for deletion,
https://kubernetes.io/docs/concepts/architecture/garbage-collection/ .
"""

from __future__ import annotations

import copy
import secrets
import string
from typing import Any

from .admission import admit
from .apimachinery import (
    JSON,
    ApiError,
    already_exists,
    bad_request,
    conflict,
    fields_match,
    invalid,
    json_patch,
    labels_match,
    merge_patch,
    not_found,
    parse_field_selector,
    parse_label_selector,
    rfc3339,
)
from .store import RESOURCES, Clock, ResourceType, Store

NAMESPACES = RESOURCES[("", "namespaces")]
PODS = RESOURCES[("", "pods")]
NODES = RESOURCES[("", "nodes")]
JOBS = RESOURCES[("batch", "jobs")]
CONFIGMAPS = RESOURCES[("", "configmaps")]
SECRETS = RESOURCES[("", "secrets")]

# https://kubernetes.io/docs/concepts/overview/working-with-objects/finalizers/
FOREGROUND = "foregroundDeletion"
ORPHAN = "orphan"
# The API server answers a Job delete without a propagation policy with this warning: the
# batch/v1 REST default is to orphan the Job's pods (kubectl passes Background itself).
JOB_ORPHAN_WARNING = (
    '299 - "child pods are preserved by default when jobs are deleted; set '
    "propagationPolicy=Background to remove them or set propagationPolicy=Orphan to suppress "
    'this warning"'
)
# https://kubernetes.io/docs/concepts/overview/working-with-objects/names/#generated-names
_GENERATED = string.ascii_lowercase + string.digits


class Emulator:
    def __init__(self, clock: Clock | None = None, history_limit: int = 2000) -> None:
        self.clock = clock or Clock()
        self.store = Store(self.clock, history_limit)
        self.seed_namespaces()

    def seed_namespaces(self) -> None:
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            obj: JSON = {
                "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }
            self.store.new_object_metadata(obj, NAMESPACES, None)
            self.store.commit(NAMESPACES, obj, "ADDED")

    # -- reading --

    def get(self, res: ResourceType, ns: str | None, name: str) -> JSON:
        obj = self.store.get(res, ns, name)
        if obj is None:
            raise not_found(res.plural, res.group, name)
        return obj

    def list(
        self,
        res: ResourceType,
        ns: str | None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[JSON]:
        lreq = parse_label_selector(label_selector)
        freq = parse_field_selector(field_selector)
        return [
            o
            for o in self.store.all(res, ns)
            if labels_match(lreq, o["metadata"].get("labels") or {}) and fields_match(freq, o)
        ]

    # -- writing --

    def _require_namespace(self, res: ResourceType, ns: str | None) -> None:
        if not res.namespaced:
            return
        if not ns:
            raise bad_request(
                "the namespace of the object does not match the namespace on the request"
            )
        space = self.store.get(NAMESPACES, None, ns)
        if space is None:
            raise not_found("namespaces", "", ns)
        if space["metadata"].get("deletionTimestamp"):
            # https://kubernetes.io/docs/concepts/overview/working-with-objects/namespaces/
            raise ApiError(
                403,
                "Forbidden",
                f"unable to create new content in namespace {ns} because it is being terminated",
            )

    def create(
        self,
        res: ResourceType,
        ns: str | None,
        body: JSON,
        *,
        dry_run: bool = False,
    ) -> JSON:
        obj = copy.deepcopy(body)
        if not isinstance(obj, dict):
            raise bad_request("the body of the request was in an unknown format")
        meta = obj.setdefault("metadata", {})
        if res.namespaced and meta.get("namespace") not in (None, "", ns):
            raise bad_request(
                "the namespace of the provided object does not match the "
                "namespace sent on the request"
            )
        if not meta.get("name"):
            gen = meta.get("generateName")
            if not gen:
                raise invalid(
                    res.kind,
                    res.group,
                    "",
                    [("metadata.name", "Required value: name or generateName is required")],
                )
            meta["name"] = gen + "".join(secrets.choice(_GENERATED) for _ in range(5))
        self._require_namespace(res, ns)
        if self.store.get(res, ns, meta["name"]) is not None:
            raise already_exists(res.plural, res.group, meta["name"])
        for f in ("resourceVersion", "uid", "deletionTimestamp", "creationTimestamp"):
            meta.pop(f, None)
        if res.plural in ("pods", "jobs"):
            obj["status"] = {}
        self.store.new_object_metadata(obj, res, ns)
        admit(res, obj, None)
        if dry_run:
            return obj
        return self.store.commit(res, obj, "ADDED")

    def replace(
        self,
        res: ResourceType,
        ns: str | None,
        name: str,
        body: JSON,
        subresource: str | None = None,
        *,
        check_rv: bool = True,
    ) -> JSON:
        old = self.get(res, ns, name)
        new = copy.deepcopy(body)
        meta = new.setdefault("metadata", {})
        if meta.get("name") not in (None, name):
            raise bad_request("the name of the object does not match the name on the URL")
        rv = meta.get("resourceVersion")
        if check_rv and rv not in (None, "") and rv != old["metadata"]["resourceVersion"]:
            raise conflict(res.plural, res.group, name)
        # server-owned metadata cannot be changed by clients
        for f in (
            "uid",
            "creationTimestamp",
            "namespace",
            "name",
            "generation",
            "deletionTimestamp",
        ):
            if f in old["metadata"]:
                meta[f] = old["metadata"][f]
            else:
                meta.pop(f, None)
        new["apiVersion"], new["kind"] = res.api_version, res.kind
        if "status" in res.subresources:
            # https://kubernetes.io/docs/concepts/extend-kubernetes/api-extension/custom-resources/#status-subresource
            # (built-in kinds behave alike): the main resource ignores status, /status ignores
            # everything else
            if subresource == "status":
                status = new.get("status")
                new = copy.deepcopy(old)
                new["status"] = status
            else:
                new["status"] = copy.deepcopy(old.get("status"))
        if subresource != "status":
            admit(res, new, old)
            if new.get("spec") != old.get("spec"):
                meta["generation"] = old["metadata"].get("generation", 1) + 1
        if new == old:
            return old
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self.remove(res, new)
        return self.store.commit(res, new, "MODIFIED")

    def patch(
        self,
        res: ResourceType,
        ns: str | None,
        name: str,
        patch: Any,
        content_type: str,
        subresource: str | None = None,
    ) -> JSON:
        old = self.get(res, ns, name)
        base = copy.deepcopy(old)
        if content_type.startswith("application/json-patch+json"):
            if not isinstance(patch, list):
                raise bad_request("a JSON patch is a list of operations")
            new = json_patch(base, patch)
        elif content_type.startswith("application/merge-patch+json"):
            new = merge_patch(base, patch)
        elif content_type.startswith("application/strategic-merge-patch+json"):
            # NOTE: strategic merge is approximated: keyed lists of STRATEGIC_MERGE_KEYS merge by
            # key; `$patch` directives are not supported
            new = merge_patch(base, patch, strategic=True)
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media "
                f"types include: application/json-patch+json, "
                f"application/merge-patch+json, application/strategic-merge-patch+json"
                f" (got {content_type})",
            )
        return self.replace(res, ns, name, new, subresource)

    def write(self, res: ResourceType, obj: JSON) -> JSON:
        """A controller's own write of a whole object (status included), no precondition."""
        meta = obj["metadata"]
        if self.store.get(res, meta.get("namespace"), meta["name"]) == obj:
            return obj
        return self.store.commit(res, obj, "MODIFIED")

    def remove(self, res: ResourceType, obj: JSON) -> JSON:
        """Remove from storage now (finalizers done)."""
        return self.store.commit(res, obj, "DELETED")

    def delete(
        self,
        res: ResourceType,
        ns: str | None,
        name: str,
        propagation: str | None = None,
        preconditions: JSON | None = None,
    ) -> tuple[JSON, int, str | None]:
        """Returns (object, HTTP status, warning header or None).

        Background: the object goes now and the garbage collector deletes its dependents
        afterwards. Foreground: the object gets a deletionTimestamp and the foregroundDeletion
        finalizer, and goes once its blocking dependents are gone. Orphan: the dependents lose
        their ownerReference to it. 200 when the object is gone, 202 when it still has
        finalizers.
        """
        obj = copy.deepcopy(self.get(res, ns, name))
        meta = obj["metadata"]
        pre = preconditions or {}
        if pre.get("uid") and pre["uid"] != meta["uid"]:
            raise conflict(res.plural, res.group, name)
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
            raise conflict(res.plural, res.group, name)
        warning = None
        if propagation is None:
            if res.plural == "jobs":
                propagation, warning = "Orphan", JOB_ORPHAN_WARNING
            else:
                propagation = "Background"
        if propagation not in ("Background", "Foreground", "Orphan"):
            raise bad_request(f"unsupported propagationPolicy {propagation!r}")
        if meta.get("deletionTimestamp"):
            return obj, 202, warning
        if propagation == "Orphan":
            self.orphan_dependents(meta["uid"])
        finalizers = list(meta.get("finalizers") or [])
        if propagation == "Foreground":
            finalizers.append(FOREGROUND)
        if finalizers:
            meta["finalizers"] = finalizers
            meta["deletionTimestamp"] = rfc3339(self.clock.now())
            meta["deletionGracePeriodSeconds"] = 0
            if res.plural == "namespaces":
                obj.setdefault("status", {})["phase"] = "Terminating"
            return self.store.commit(res, obj, "MODIFIED"), 202, warning
        if res.plural == "namespaces":
            # the namespace controller empties it first
            # https://kubernetes.io/docs/tasks/administer-cluster/namespaces/#deleting-a-namespace
            meta["deletionTimestamp"] = rfc3339(self.clock.now())
            obj.setdefault("status", {})["phase"] = "Terminating"
            return self.store.commit(res, obj, "MODIFIED"), 200, warning
        return self.remove(res, obj), 200, warning

    def orphan_dependents(self, owner_uid: str) -> None:
        for key, obj in list(self.store.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if any(r.get("uid") == owner_uid for r in refs):
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != owner_uid]
                if not new["metadata"]["ownerReferences"]:
                    del new["metadata"]["ownerReferences"]
                self.store.commit(resource_of(key), new, "MODIFIED")


def resource_of(key: tuple[str, str, str, str]) -> ResourceType:
    return RESOURCES[(key[0], key[1])]
