"""Kubernetes Job and Pod status -> our provider states and failure classes, per completion
index, through one total function (``index_state``).

Sources, in the order they decide (the first that applies wins):

1. the index is in the Job's ``status.completedIndexes``, or its pod Succeeded: SUCCEEDED;
2. the index's latest pod Failed: by ``POD_FAILURES`` (a ``DisruptionTarget`` condition, the
   pod's ``status.reason``, the container's terminated reason), else its exit code (a user
   error), else NODE_FAILURE;
3. the index's pod waits for a reason in ``CONFIGURATION_ERRORS``: FAILED, PROVIDER_REJECTED
   (an image that cannot be pulled or a missing Secret does not get better by retrying);
4. the index is in ``status.failedIndexes`` and its pod is gone (or going: deleted) without
   telling why: it was deleted before it ended (evicted, preempted, its node lost),
   PREEMPTED. A live pod's own status decides instead (the Job's status can be seen before
   the pod's: its Failed status, when it comes, says why);
5. the Job Failed: by ``JOB_FAILURES`` (``DeadlineExceeded``: TIMEOUT); another reason leaves
   indexes that did not end on their own UNKNOWN;
6. a live pod: Running -> RUNNING; Pending -> QUEUED (the message says when it is
   unschedulable); ``Unschedulable`` (the scheduler found no node for it: ``PodScheduled``
   False with that reason) for ``unschedulable_after`` seconds or longer -> FAILED,
   NO_CAPACITY: the pod never ran, and the core places the trial again elsewhere and cancels
   this attempt (the driver deletes the waiting pod, so it cannot start later). A pod held
   by its scheduling gates (``SchedulingGated``) is waiting on purpose, not for capacity:
   QUEUED however long;
7. no pod yet: QUEUED (suspended: waiting for Kueue admission).

References: https://kubernetes.io/docs/concepts/workloads/controllers/job/ (conditions, pod
failure policy, per-index backoff), https://kubernetes.io/docs/concepts/workloads/pods/disruptions/
(DisruptionTarget reasons), https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/
(phases, container states).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from msgspec import Struct

from stowplan.scheduler.reports import ProviderState
from stowplan.spec.models import FailureClass

POD_FAILURES: dict[str, FailureClass] = {
    # DisruptionTarget condition reasons
    "PreemptionByScheduler": FailureClass.PREEMPTED,
    "DeletionByTaintManager": FailureClass.NODE_FAILURE,
    "EvictionByEvictionAPI": FailureClass.PREEMPTED,
    "DeletionByPodGC": FailureClass.NODE_FAILURE,
    "TerminationByKubelet": FailureClass.PREEMPTED,
    # pod status.reason
    "Evicted": FailureClass.PREEMPTED,
    "DeadlineExceeded": FailureClass.TIMEOUT,
    "NodeLost": FailureClass.NODE_FAILURE,
    "Shutdown": FailureClass.PREEMPTED,
    "NodeShutdown": FailureClass.PREEMPTED,
    "Terminated": FailureClass.PREEMPTED,
    "UnexpectedAdmissionError": FailureClass.NODE_FAILURE,
    "OutOfcpu": FailureClass.NODE_FAILURE,
    "OutOfmemory": FailureClass.NODE_FAILURE,
    # container terminated reasons
    "OOMKilled": FailureClass.OUT_OF_MEMORY,
    "ContainerCannotRun": FailureClass.PROVIDER_REJECTED,
    "StartError": FailureClass.PROVIDER_REJECTED,
}
"""Why a pod failed -> the failure class (a reason not listed: the exit code decides)."""
CONFIGURATION_ERRORS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
"""Container waiting reasons that retrying does not mend."""
UNSCHEDULABLE = "Unschedulable"
"""The ``PodScheduled`` False reason the scheduler gives when no node fits the pod (a pod
held by scheduling gates says ``SchedulingGated`` instead)."""
JOB_FAILURES: dict[str, FailureClass] = {"DeadlineExceeded": FailureClass.TIMEOUT}
"""A failed Job's reason -> the class of its indexes that did not end on their own."""


class IndexState(Struct, frozen=True, kw_only=True):
    state: ProviderState
    failure: FailureClass | None = None
    message: str = ""
    exit_code: int | None = None
    node: str | None = None
    pod: str | None = None
    started_at: float | None = None
    ended_at: float | None = None


def parse_time(value: object) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def parse_indexes(text: object) -> set[int]:
    """``"0-2,5"`` -> {0, 1, 2, 5} (``completedIndexes``/``failedIndexes``)."""
    out: set[int] = set()
    if not isinstance(text, str):
        return out
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def condition(obj: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype and c.get("status") == "True":
            return dict(c)
    return None


def _condition_any(obj: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return dict(c)
    return None


def pod_index(pod: Mapping[str, Any]) -> int | None:
    meta = pod.get("metadata") or {}
    for src in (meta.get("labels") or {}, meta.get("annotations") or {}):
        v = src.get("batch.kubernetes.io/job-completion-index")
        if isinstance(v, str) and v.isdigit():
            return int(v)
    return None


def latest_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    if not pods:
        return None
    return max(
        pods,
        key=lambda p: (
            str((p.get("metadata") or {}).get("creationTimestamp") or ""),
            str((p.get("metadata") or {}).get("name") or ""),
        ),
    )


def _container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return dict(statuses[0]) if statuses else {}


def exit_record(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    """The wrapper's exit record (``render.WRAPPER``), from the container's termination
    message; None when there is none (the wrapper did not get that far)."""
    term = (_container(pod).get("state") or {}).get("terminated") or {}
    try:
        rec = json.loads(term.get("message") or "")
    except (TypeError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("stowplan") == 1 else None


def pod_failure(pod: Mapping[str, Any]) -> tuple[FailureClass, str, int | None]:
    """Why a Failed (or disrupted) pod failed: class, message, exit code."""
    st = pod.get("status") or {}
    cs = _container(pod)
    term = (cs.get("state") or {}).get("terminated") or {}
    code = term.get("exitCode")
    code = int(code) if isinstance(code, int) else None
    disruption = condition(pod, "DisruptionTarget")
    if disruption is not None:
        reason = str(disruption.get("reason") or "")
        cls = POD_FAILURES.get(reason, FailureClass.PREEMPTED)
        return cls, f"{reason}: {disruption.get('message') or 'disrupted'}", code
    reason = str(st.get("reason") or "")
    if reason in POD_FAILURES:
        return POD_FAILURES[reason], f"{reason}: {st.get('message') or ''}".rstrip(": "), code
    treason = str(term.get("reason") or "")
    if treason in POD_FAILURES:
        return POD_FAILURES[treason], f"{treason} (exit code {code})", code
    if code is not None and code != 0:
        missing = (exit_record(pod) or {}).get("missing") or []
        if missing:
            return (
                FailureClass.USER_ERROR,
                "declared output(s) missing: " + ", ".join(map(str, missing)),
                code,
            )
        return FailureClass.USER_ERROR, f"exit code {code}", code
    return FailureClass.NODE_FAILURE, f"pod failed: {reason or 'no reason given'}", code


def waiting_since(pod: Mapping[str, Any]) -> float | None:
    """When a pod the scheduler found no node for (``PodScheduled`` False, ``Unschedulable``)
    started waiting; None for any other pod. Such a pod turns NO_CAPACITY by the clock alone
    (``index_state``), which a watch needs to know."""
    if (pod.get("status") or {}).get("phase") not in (None, "Pending"):
        return None
    sched = _condition_any(pod, "PodScheduled")
    if sched is None or sched.get("status") != "False" or sched.get("reason") != UNSCHEDULABLE:
        return None
    since = parse_time(sched.get("lastTransitionTime"))
    if since is None:  # not written: count from the pod's creation
        since = parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
    return since


def index_state(
    job: Mapping[str, Any] | None,
    index: int,
    pods: Sequence[Mapping[str, Any]],
    *,
    now: float,
    unschedulable_after: float = 600.0,
    gone: Sequence[Mapping[str, Any]] = (),
) -> IndexState:
    """The state of completion ``index`` of ``job`` given the pods seen for it: ``pods`` those
    that exist now, ``gone`` the last state seen of deleted ones. Total: what is not
    understood is UNKNOWN."""
    if job is None:
        return IndexState(state=ProviderState.UNKNOWN, message="no such Job")
    status = job.get("status") or {}
    pod = latest_pod([*pods, *gone])
    live = (
        pod is not None
        and any(p is pod for p in pods)
        and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        and not (pod.get("metadata") or {}).get("deletionTimestamp")
    )
    common: dict[str, Any] = {}
    if pod is not None:
        pst = pod.get("status") or {}
        term = (_container(pod).get("state") or {}).get("terminated") or {}
        common = {
            "pod": (pod.get("metadata") or {}).get("name"),
            "node": (pod.get("spec") or {}).get("nodeName"),
            "started_at": parse_time(pst.get("startTime")),
            "ended_at": parse_time(term.get("finishedAt")),
        }
    phase = (pod.get("status") or {}).get("phase") if pod is not None else None
    if index in parse_indexes(status.get("completedIndexes")) or phase == "Succeeded":
        return IndexState(state=ProviderState.SUCCEEDED, exit_code=0, message="Complete", **common)
    if pod is not None and (phase == "Failed" or condition(pod, "DisruptionTarget")):
        cls, message, code = pod_failure(pod)
        return IndexState(
            state=ProviderState.FAILED, failure=cls, message=message, exit_code=code, **common
        )
    if pod is not None:
        waiting = (_container(pod).get("state") or {}).get("waiting") or {}
        reason = str(waiting.get("reason") or "")
        if reason in CONFIGURATION_ERRORS:
            return IndexState(
                state=ProviderState.FAILED,
                failure=FailureClass.PROVIDER_REJECTED,
                message=f"{reason}: {waiting.get('message') or ''} (not retried: fix the "
                "image, pull secret or Secret)",
                **common,
            )
    if not live and index in parse_indexes(status.get("failedIndexes")):
        return IndexState(
            state=ProviderState.FAILED,
            failure=FailureClass.PREEMPTED,
            message="index failed after its pod was deleted (evicted, preempted or node lost)",
            **common,
        )
    failed = condition(job, "Failed") or condition(job, "FailureTarget")
    if failed is not None:
        reason = str(failed.get("reason") or "")
        job_cls = JOB_FAILURES.get(reason)
        if job_cls is None:
            return IndexState(
                state=ProviderState.UNKNOWN,
                message=f"Job failed ({reason}) before this index ended",
                **common,
            )
        return IndexState(
            state=ProviderState.FAILED,
            failure=job_cls,
            message=f"Job {reason}: {failed.get('message') or ''}".rstrip(": "),
            **common,
        )
    if condition(job, "Complete") is not None:
        return IndexState(
            state=ProviderState.UNKNOWN, message="Job complete without this index", **common
        )
    if pod is not None:
        if phase == "Running":
            # in failedIndexes already: the pod's Failed status is on its way
            ending = index in parse_indexes(status.get("failedIndexes"))
            return IndexState(
                state=ProviderState.RUNNING, message="ending" if ending else "Running", **common
            )
        sched = _condition_any(pod, "PodScheduled")
        if sched is not None and sched.get("status") == "False":
            since = parse_time(sched.get("lastTransitionTime"))
            if since is None:  # not written: count from the pod's creation
                since = parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
            waited = now - since if since is not None else 0.0
            why = str(sched.get("message") or sched.get("reason") or "")
            if sched.get("reason") == UNSCHEDULABLE and waited >= unschedulable_after:
                return IndexState(
                    state=ProviderState.FAILED,
                    failure=FailureClass.NO_CAPACITY,
                    message=f"unschedulable for {waited:.0f}s (unschedulable_after = "
                    f"{unschedulable_after:g}s): {why}",
                    **common,
                )
            return IndexState(
                state=ProviderState.QUEUED,
                message=f"unschedulable: {why}"
                if sched.get("reason") == UNSCHEDULABLE
                else f"not scheduled yet ({sched.get('reason') or 'no reason given'}): {why}",
                **common,
            )
        if phase in (None, "Pending"):
            waiting = (_container(pod).get("state") or {}).get("waiting") or {}
            return IndexState(
                state=ProviderState.QUEUED,
                message=f"Pending{': ' + str(waiting['reason']) if waiting.get('reason') else ''}",
                **common,
            )
        return IndexState(state=ProviderState.UNKNOWN, message=f"pod phase {phase}", **common)
    if (job.get("spec") or {}).get("suspend"):
        return IndexState(
            state=ProviderState.QUEUED, message="Job suspended (waiting for Kueue admission)"
        )
    return IndexState(state=ProviderState.QUEUED, message="no pod yet")
