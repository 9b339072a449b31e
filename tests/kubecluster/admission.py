"""Defaulting and validation at create/update time, as the API server does before storing.

Only what upstream documents for the fields a batch driver writes; every rule names its source.
Unknown fields are not rejected here: the schema check is :mod:`tests.kubecluster.validation`
(kubernetes-validate, strict), which tests run on every manifest they render.
"""

from __future__ import annotations

from typing import Any

from .apimachinery import JSON, invalid, metadata_errors, parse_quantity
from .store import ResourceType

MAX_INT32 = 2**31 - 1
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
JOB_NAME = "batch.kubernetes.io/job-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
INDEX_FAILURE_COUNT = "batch.kubernetes.io/job-index-failure-count"


def admit(res: ResourceType, obj: JSON, old: JSON | None) -> None:
    """Default and validate ``obj`` in place; raise 422 Invalid listing every cause."""
    name = obj["metadata"].get("name", "")
    causes = metadata_errors(obj["metadata"])
    if res.plural == "namespaces":
        # https://kubernetes.io/docs/concepts/overview/working-with-objects/namespaces/ :
        # namespace names are RFC 1123 labels
        causes = metadata_errors(obj["metadata"], name_rule="label")
    elif res.plural == "pods":
        if old is None:
            default_pod(obj)
        causes += pod_errors(obj.get("spec") or {}, "spec")
    elif res.plural == "jobs":
        if old is None:
            default_job(obj)
        causes += job_errors(obj, old)
    elif res.plural in ("configmaps", "secrets"):
        causes += data_errors(obj)
    if causes:
        raise invalid(res.kind, res.group, name, causes)


# --- pods ---------------------------------------------------------------------------------------


def default_pod(pod: JSON) -> None:
    spec = pod.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    for c in spec.get("containers") or []:
        # https://kubernetes.io/docs/concepts/configuration/manage-resources-containers/ :
        # "If you specify a limit for a resource, but do not specify any request ... Kubernetes
        # copies the limit you specified and uses it as the requested value"
        res = c.setdefault("resources", {})
        for k, v in (res.get("limits") or {}).items():
            res.setdefault("requests", {}).setdefault(k, v)
    # the DefaultTolerationSeconds admission controller adds these two tolerations:
    # https://kubernetes.io/docs/concepts/scheduling-eviction/taint-and-toleration/#taint-based-evictions
    tolerations = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(
            t.get("key") == key and t.get("effect") in (None, "", "NoExecute") for t in tolerations
        ):
            tolerations.append(
                {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            )
    status = pod.setdefault("status", {})
    status.setdefault("phase", "Pending")
    status["qosClass"] = qos_class(spec)


def qos_class(spec: JSON) -> str:
    # https://kubernetes.io/docs/concepts/workloads/pods/pod-qos/
    containers = spec.get("containers") or []
    reqs = [c.get("resources", {}).get("requests") or {} for c in containers]
    lims = [c.get("resources", {}).get("limits") or {} for c in containers]
    if not any(reqs) and not any(lims):
        return "BestEffort"
    if all(
        all(k in lim and str(lim[k]) == str(req.get(k, lim[k])) for k in ("cpu", "memory"))
        for req, lim in zip(reqs, lims, strict=True)
    ):
        return "Guaranteed"
    return "Burstable"


def pod_errors(spec: JSON, path: str) -> list[tuple[str, str]]:
    # https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/
    causes: list[tuple[str, str]] = []
    containers = spec.get("containers") or []
    if not containers:
        causes.append((f"{path}.containers", "Required value"))
    names: set[str] = set()
    for i, c in enumerate(containers + (spec.get("initContainers") or [])):
        p = f"{path}.containers[{i}]"
        cname = c.get("name") or ""
        if not cname:
            causes.append((f"{p}.name", "Required value"))
        elif cname in names:
            causes.append((f"{p}.name", f'Duplicate value: "{cname}"'))
        names.add(cname)
        image = c.get("image")
        if not image:
            causes.append((f"{p}.image", "Required value"))
        elif image.strip() != image:
            causes.append(
                (f"{p}.image", "Invalid value: must not have leading or trailing whitespace")
            )
        for kind in ("requests", "limits"):
            for k, v in ((c.get("resources") or {}).get(kind) or {}).items():
                try:
                    parse_quantity(v)
                except ValueError as e:
                    causes.append((f"{p}.resources.{kind}[{k}]", f"Invalid value: {v!r}: {e}"))
    if spec.get("restartPolicy") not in (None, "Always", "OnFailure", "Never"):
        causes.append((f"{path}.restartPolicy", "Unsupported value"))
    return causes


# --- jobs ---------------------------------------------------------------------------------------
# https://kubernetes.io/docs/concepts/workloads/controllers/job/
# https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/job-v1/


def default_job(job: JSON) -> None:
    spec = job.setdefault("spec", {})
    if spec.get("completions") is None and spec.get("parallelism") is None:
        spec["completions"] = 1
    spec.setdefault("parallelism", 1)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    # "When you set backoffLimitPerIndex ... backoffLimit ... defaults to 2147483647"
    spec.setdefault(
        "backoffLimit", MAX_INT32 if spec.get("backoffLimitPerIndex") is not None else 6
    )
    spec.setdefault(
        "podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed"
    )
    template = spec.setdefault("template", {})
    uid = job["metadata"]["uid"]
    name = job["metadata"]["name"]
    labels = template.setdefault("metadata", {}).setdefault("labels", {})
    if not spec.get("manualSelector"):
        # "the system picks labels unique to this Job and adds them to the pod template"
        labels.update(
            {CONTROLLER_UID: uid, "controller-uid": uid, JOB_NAME: name, "job-name": name}
        )
        spec["selector"] = {"matchLabels": {CONTROLLER_UID: uid}}
    if not job["metadata"].get("labels"):
        job["metadata"]["labels"] = dict(labels)
    job.setdefault("status", {})


def job_errors(job: JSON, old: JSON | None) -> list[tuple[str, str]]:
    spec: JSON = job.get("spec") or {}
    causes: list[tuple[str, str]] = []
    name = job["metadata"].get("name", "")
    if len(name) > 63:
        # "Even when the name is a DNS subdomain, the name must be no longer than 63 characters."
        causes.append(("metadata.name", "Invalid value: must be no more than 63 characters"))
    tspec = (spec.get("template") or {}).get("spec") or {}
    causes += pod_errors(tspec, "spec.template.spec")
    restart = tspec.get("restartPolicy")
    if restart not in ("OnFailure", "Never"):
        causes.append(
            (
                "spec.template.spec.restartPolicy",
                f'Unsupported value: "{restart}": supported values: "OnFailure", "Never"',
            )
        )
    indexed = spec.get("completionMode") == "Indexed"
    if spec.get("completionMode") not in ("Indexed", "NonIndexed"):
        causes.append(("spec.completionMode", "Unsupported value"))
    if indexed and spec.get("completions") is None:
        causes.append(("spec.completions", "Required value: when completion mode is Indexed"))
    if indexed and (spec.get("parallelism") or 0) > 100_000:
        causes.append(
            (
                "spec.parallelism",
                "Invalid value: must be less than or equal to 100000 "
                "when completion mode is Indexed",
            )
        )
    for f in (
        "parallelism",
        "completions",
        "backoffLimit",
        "backoffLimitPerIndex",
        "maxFailedIndexes",
        "activeDeadlineSeconds",
    ):
        v = spec.get(f)
        if v is not None and (
            not isinstance(v, int) or v < 0 or (f == "activeDeadlineSeconds" and v == 0)
        ):
            causes.append((f"spec.{f}", f"Invalid value: {v!r}"))
    per_index = spec.get("backoffLimitPerIndex")
    if per_index is not None and not indexed:
        causes.append(("spec.backoffLimitPerIndex", "Forbidden: requires indexed completion mode"))
    if spec.get("maxFailedIndexes") is not None:
        if per_index is None:
            causes.append(
                (
                    "spec.maxFailedIndexes",
                    "Required value: when maxFailedIndexes is specified, "
                    "backoffLimitPerIndex must be specified",
                )
            )
        elif spec["maxFailedIndexes"] > (spec.get("completions") or 0):
            causes.append(
                (
                    "spec.maxFailedIndexes",
                    "Invalid value: must be less than or equal to completions",
                )
            )
    if spec.get("successPolicy") is not None and not indexed:
        causes.append(("spec.successPolicy", "Invalid value: requires indexed completion mode"))
    policy = spec.get("podFailurePolicy")
    if policy is not None:
        causes += pod_failure_policy_errors(policy, restart, per_index)
    if spec.get("selector") and not spec.get("manualSelector") and old is None:
        uid = job["metadata"].get("uid")
        if spec["selector"] != {"matchLabels": {CONTROLLER_UID: uid}}:
            causes.append(("spec.selector", "Invalid value: `selector` will be auto-generated"))
    if old is not None:
        # the pod template of a Job is immutable (except for a suspended Job's scheduling
        # directives, which this emulator does not model)
        if old["spec"].get("template") != spec.get("template"):
            causes.append(("spec.template", "Invalid value: field is immutable"))
        for f in ("completionMode", "backoffLimitPerIndex", "podFailurePolicy", "selector"):
            if old["spec"].get(f) != spec.get(f):
                causes.append((f"spec.{f}", "Invalid value: field is immutable"))
    return causes


def pod_failure_policy_errors(policy: JSON, restart: Any, per_index: Any) -> list[tuple[str, str]]:
    # https://kubernetes.io/docs/concepts/workloads/controllers/job/#pod-failure-policy
    causes: list[tuple[str, str]] = []
    if restart != "Never":
        causes.append(
            (
                "spec.template.spec.restartPolicy",
                'Invalid value: only "Never" is supported when podFailurePolicy is specified',
            )
        )
    for i, rule in enumerate(policy.get("rules") or []):
        p = f"spec.podFailurePolicy.rules[{i}]"
        action = rule.get("action")
        if action not in ("FailJob", "FailIndex", "Ignore", "Count"):
            causes.append((f"{p}.action", f'Unsupported value: "{action}"'))
        if action == "FailIndex" and per_index is None:
            causes.append((f"{p}.action", "Forbidden: requires the backoffLimitPerIndex to be set"))
        has_codes = rule.get("onExitCodes") is not None
        has_conds = bool(rule.get("onPodConditions"))
        if has_codes == has_conds:
            causes.append(
                (p, "Invalid value: specifying one of OnExitCodes and OnPodConditions is required")
            )
        if has_codes:
            codes = rule["onExitCodes"]
            if codes.get("operator") not in ("In", "NotIn"):
                causes.append((f"{p}.onExitCodes.operator", "Unsupported value"))
            values = codes.get("values") or []
            if not values:
                causes.append((f"{p}.onExitCodes.values", "Required value"))
            if codes.get("operator") == "In" and 0 in values:
                causes.append(
                    (
                        f"{p}.onExitCodes.values",
                        "Invalid value: 0: must not be 0 for the In operator",
                    )
                )
    return causes


def data_errors(obj: JSON) -> list[tuple[str, str]]:
    # https://kubernetes.io/docs/concepts/configuration/configmap/ : keys are
    # [-._a-zA-Z0-9]+ and the data may not exceed 1 MiB
    import re

    causes: list[tuple[str, str]] = []
    size = 0
    for field in ("data", "binaryData", "stringData"):
        for k, v in (obj.get(field) or {}).items():
            if not re.fullmatch(r"[-._a-zA-Z0-9]+", k) or len(k) > 253:
                causes.append(
                    (
                        f"{field}[{k}]",
                        "Invalid value: a valid config key must consist "
                        "of alphanumeric characters, '-', '_' or '.'",
                    )
                )
            size += len(k) + len(str(v))
    if size > 1024 * 1024:
        causes.append(("data", "Too long: must have at most 1048576 bytes"))
    return causes
