"""What a kubelet would report about a pod: pure functions from a pod to its next status.

The tests decide what happens to a container (it runs, exits with a code, is OOM killed, cannot
pull its image, is evicted); these functions write the status the way the kubelet and the
control plane report it:
https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/
https://kubernetes.io/docs/concepts/workloads/pods/disruptions/#pod-disruption-conditions
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

from .apimachinery import JSON, rfc3339

TERMINAL_PHASES = ("Succeeded", "Failed")

# https://kubernetes.io/docs/concepts/workloads/pods/disruptions/#pod-disruption-conditions
DISRUPTION_REASONS = (
    "PreemptionByScheduler",
    "DeletionByTaintManager",
    "EvictionByEvictionAPI",
    "DeletionByPodGC",
    "TerminationByKubelet",
)
# https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#container-state-waiting
WAITING_REASONS = (
    "ContainerCreating",
    "ErrImagePull",
    "ImagePullBackOff",
    "CreateContainerConfigError",
    "InvalidImageName",
    "CrashLoopBackOff",
)


@dataclass(frozen=True)
class PodOutcome:
    """What a test wants to happen to a scheduled pod (see ``KubeCluster.set_pod_behaviour``).

    ``run``: Running and Ready, then left alone. ``succeed``/``fail``: Running, then terminated
    with ``exit_code``. ``oom``: terminated by the OOM killer (exit 137, reason OOMKilled).
    ``evict``: a disruption with ``reason`` (one of DISRUPTION_REASONS). ``wait``: stays Pending
    with the container waiting for ``reason`` (one of WAITING_REASONS). ``log`` is appended to the
    container's log before it terminates.
    """

    kind: Literal["run", "succeed", "fail", "oom", "evict", "wait"]
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    log: str = ""


def is_terminal(pod: JSON) -> bool:
    return pod.get("status", {}).get("phase") in TERMINAL_PHASES


def container_names(pod: JSON) -> list[str]:
    return [c["name"] for c in pod.get("spec", {}).get("containers") or []]


def _set_condition(
    status: JSON, ctype: str, value: str, now: str, reason: str = "", message: str = ""
) -> None:
    conds = status.setdefault("conditions", [])
    for c in conds:
        if c["type"] == ctype:
            if c["status"] != value:
                c["lastTransitionTime"] = now
            c["status"] = value
            c.pop("reason", None)
            c.pop("message", None)
            break
    else:
        c = {"type": ctype, "status": value, "lastProbeTime": None, "lastTransitionTime": now}
        conds.append(c)
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message


def set_condition(
    status: JSON, ctype: str, value: str, now: float, reason: str = "", message: str = ""
) -> None:
    _set_condition(status, ctype, value, rfc3339(now), reason, message)


def scheduled(pod: JSON, node: str, now: float) -> JSON:
    pod = copy.deepcopy(pod)
    pod["spec"]["nodeName"] = node
    st = pod.setdefault("status", {})
    set_condition(st, "PodScheduled", "True", now)
    return pod


def unschedulable(pod: JSON, message: str, now: float) -> JSON:
    pod = copy.deepcopy(pod)
    # https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-conditions :
    # PodScheduled False with reason Unschedulable
    set_condition(
        pod.setdefault("status", {}), "PodScheduled", "False", now, "Unschedulable", message
    )
    return pod


def _container_id(pod: JSON, name: str) -> str:
    return f"emulated://{pod['metadata']['uid']}/{name}"


def running(pod: JSON, now: float) -> JSON:
    pod = copy.deepcopy(pod)
    st = pod.setdefault("status", {})
    st["phase"] = "Running"
    st.setdefault("startTime", rfc3339(now))
    for ctype in ("Initialized", "ContainersReady", "Ready"):
        set_condition(st, ctype, "True", now)
    st["containerStatuses"] = [
        {
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": "",
            "containerID": _container_id(pod, c["name"]),
            "ready": True,
            "started": True,
            "restartCount": 0,
            "state": {"running": {"startedAt": rfc3339(now)}},
            "lastState": {},
        }
        for c in pod["spec"]["containers"]
    ]
    return pod


def terminated(pod: JSON, exit_code: int, reason: str, now: float, message: str = "") -> JSON:
    """Every container terminated; phase Succeeded when all exited 0, else Failed."""
    if pod.get("status", {}).get("phase") != "Running":
        pod = running(pod, now)
    else:
        pod = copy.deepcopy(pod)
    st = pod["status"]
    for cs in st["containerStatuses"]:
        started = (cs["state"].get("running") or {}).get("startedAt", rfc3339(now))
        term: JSON = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": started,
            "finishedAt": rfc3339(now),
            "containerID": cs["containerID"],
        }
        if message:
            term["message"] = message
        cs["state"] = {"terminated": term}
        cs["ready"] = False
        cs["started"] = False
    st["phase"] = "Succeeded" if exit_code == 0 else "Failed"
    why = "PodCompleted" if exit_code == 0 else "PodFailed"
    set_condition(st, "Ready", "False", now, why)
    set_condition(st, "ContainersReady", "False", now, why)
    return pod


def succeeded(pod: JSON, now: float, exit_code: int = 0) -> JSON:
    return terminated(pod, exit_code, "Completed" if exit_code == 0 else "Error", now)


def failed(pod: JSON, now: float, exit_code: int = 1) -> JSON:
    if exit_code == 0:
        raise ValueError("a failed container has a non-zero exit code")
    return terminated(pod, exit_code, "Error", now)


def oom_killed(pod: JSON, now: float) -> JSON:
    # the kernel's SIGKILL: 128 + 9; the container runtime reports reason OOMKilled
    return terminated(pod, 137, "OOMKilled", now)


def disrupted(pod: JSON, reason: str, now: float, message: str = "") -> JSON:
    """The DisruptionTarget condition, then the pod's containers killed: phase Failed."""
    if reason not in DISRUPTION_REASONS:
        raise ValueError(f"unknown disruption reason {reason!r}; one of {DISRUPTION_REASONS}")
    pod = copy.deepcopy(pod)
    st = pod.setdefault("status", {})
    set_condition(
        st,
        "DisruptionTarget",
        "True",
        now,
        reason,
        message
        or {
            "EvictionByEvictionAPI": "Eviction API: evicting",
            "PreemptionByScheduler": "Preempted by a higher priority pod",
            "DeletionByTaintManager": "Taint manager: deleting due to NoExecute taint",
            "DeletionByPodGC": "PodGC: node no longer exists",
            "TerminationByKubelet": "The node was low on resource: memory",
        }[reason],
    )
    if reason == "TerminationByKubelet":
        st["reason"] = "Evicted"
    if st.get("containerStatuses"):
        pod = terminated(pod, 137, "Error", now)
    else:
        st["phase"] = "Failed"
        set_condition(st, "Ready", "False", now, "PodFailed")
    return pod


def waiting(pod: JSON, reason: str, now: float, message: str = "") -> JSON:
    if reason not in WAITING_REASONS:
        raise ValueError(f"unknown waiting reason {reason!r}; one of {WAITING_REASONS}")
    pod = copy.deepcopy(pod)
    st = pod.setdefault("status", {})
    st["phase"] = "Pending"
    st.setdefault("startTime", rfc3339(now))
    set_condition(st, "Initialized", "True", now)
    set_condition(
        st,
        "ContainersReady",
        "False",
        now,
        "ContainersNotReady",
        f"containers with unready status: {container_names(pod)}",
    )
    set_condition(
        st,
        "Ready",
        "False",
        now,
        "ContainersNotReady",
        f"containers with unready status: {container_names(pod)}",
    )
    default_message = {
        "ErrImagePull": "failed to pull and unpack image",
        "ImagePullBackOff": "Back-off pulling image",
        "CreateContainerConfigError": "secret not found",
    }.get(reason, "")
    st["containerStatuses"] = [
        {
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": "",
            "ready": False,
            "started": False,
            "restartCount": 0,
            "state": {
                "waiting": {
                    "reason": reason,
                    "message": message or f'{default_message} "{c.get("image")}"',
                }
            },
            "lastState": {},
        }
        for c in pod["spec"]["containers"]
    ]
    return pod


def not_ready(pod: JSON, now: float) -> JSON:
    """The node stopped reporting: the node lifecycle controller marks pods not Ready."""
    pod = copy.deepcopy(pod)
    set_condition(pod.setdefault("status", {}), "Ready", "False", now)
    return pod
