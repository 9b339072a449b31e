"""The Kubernetes state map, as a table: a Job and the pods of one completion index in, our
state and failure class out. The pod and Job statuses are written the way the kubelet and the
Job controller report them (tests/kubecluster/kubelet.py renders them from the docs)."""

from __future__ import annotations

from typing import Any

import pytest

from stowplan.providers.kubernetes.states import (
    CONFIGURATION_ERRORS,
    index_state,
    parse_indexes,
)
from stowplan.scheduler.reports import ProviderState as S
from stowplan.spec.models import FailureClass as F
from tests.kubecluster import kubelet
from tests.kubecluster.apimachinery import rfc3339

NOW = 1_800_000_000.0


def job(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "sp-x", "uid": "u1"},
        "spec": {"completionMode": "Indexed", "completions": 3, **spec},
        "status": status or {},
    }


def pod(**kw: Any) -> dict[str, Any]:
    base = {
        "metadata": {
            "name": "sp-x-0-abcde",
            "uid": "p1",
            "creationTimestamp": "2027-01-15T08:00:00Z",
            "labels": {"batch.kubernetes.io/job-completion-index": "0"},
        },
        "spec": {"nodeName": "n1", "containers": [{"name": "main", "image": "img"}]},
        "status": {"phase": "Pending"},
    }
    base.update(kw)
    return base


def failed_job(reason: str) -> dict[str, Any]:
    return job({"conditions": [{"type": "Failed", "status": "True", "reason": reason}]})


RUNNING = kubelet.running(pod(), NOW)
CASES: list[tuple[str, dict[str, Any], list[dict[str, Any]], S, F | None, int | None]] = [
    ("completed index", job({"completedIndexes": "0-2"}), [], S.SUCCEEDED, None, 0),
    ("pod succeeded", job(), [kubelet.succeeded(RUNNING, NOW)], S.SUCCEEDED, None, 0),
    ("exit 3", job(), [kubelet.failed(RUNNING, NOW, 3)], S.FAILED, F.USER_ERROR, 3),
    ("oom", job(), [kubelet.oom_killed(RUNNING, NOW)], S.FAILED, F.OUT_OF_MEMORY, 137),
    *[
        (
            f"disrupted {r}",
            job(),
            [kubelet.disrupted(RUNNING, r, NOW)],
            S.FAILED,
            F.NODE_FAILURE if r in ("DeletionByTaintManager", "DeletionByPodGC") else F.PREEMPTED,
            137,
        )
        for r in kubelet.DISRUPTION_REASONS
    ],
    *[
        (
            f"waiting {r}",
            job(),
            [kubelet.waiting(pod(), r, NOW)],
            S.FAILED,
            F.PROVIDER_REJECTED,
            None,
        )
        for r in (
            "ErrImagePull",
            "ImagePullBackOff",
            "CreateContainerConfigError",
            "InvalidImageName",
        )
    ],
    ("creating", job(), [kubelet.waiting(pod(), "ContainerCreating", NOW)], S.QUEUED, None, None),
    ("running", job(), [RUNNING], S.RUNNING, None, None),
    ("no pod yet", job(), [], S.QUEUED, None, None),
    ("suspended (Kueue)", job(suspend=True), [], S.QUEUED, None, None),
    ("failed index, pod gone", job({"failedIndexes": "0"}), [], S.FAILED, F.PREEMPTED, None),
    ("job deadline", failed_job("DeadlineExceeded"), [RUNNING], S.FAILED, F.TIMEOUT, None),
    ("job failed, unknown why", failed_job("SomethingNew"), [], S.UNKNOWN, None, None),
    (
        "pod deadline",
        job(),
        [
            {
                **kubelet.terminated(RUNNING, 137, "Error", NOW),
                "status": {
                    **kubelet.terminated(RUNNING, 137, "Error", NOW)["status"],
                    "reason": "DeadlineExceeded",
                },
            }
        ],
        S.FAILED,
        F.TIMEOUT,
        137,
    ),
    ("no job", None, [], S.UNKNOWN, None, None),  # type: ignore[list-item]
]


@pytest.mark.parametrize(
    ("what", "j", "pods", "state", "failure", "code"), CASES, ids=[c[0] for c in CASES]
)
def test_state_map(
    what: str,
    j: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    state: S,
    failure: F | None,
    code: int | None,
) -> None:
    st = index_state(j, 0, pods, now=NOW)
    assert (st.state, st.failure, st.exit_code) == (state, failure, code), st.message


def test_configuration_errors_cover_the_issue_reasons() -> None:
    assert {
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
    } <= CONFIGURATION_ERRORS
    st = index_state(job(), 0, [kubelet.waiting(pod(), "ImagePullBackOff", NOW)], now=NOW)
    assert "ImagePullBackOff" in st.message and "not retried" in st.message


def test_unschedulable_past_the_threshold_is_no_capacity() -> None:
    p = kubelet.unschedulable(pod(spec={"containers": []}), "0/3 nodes are available", NOW - 700)
    early = index_state(job(), 0, [p], now=NOW - 101, unschedulable_after=600)
    at = index_state(job(), 0, [p], now=NOW - 100, unschedulable_after=600)
    late = index_state(job(), 0, [p], now=NOW, unschedulable_after=600)
    assert (early.state, early.failure) == (S.QUEUED, None)
    assert early.message == "unschedulable: 0/3 nodes are available"
    # the pod never ran: the core re-places the trial (and cancels this attempt)
    assert (at.state, at.failure) == (late.state, late.failure) == (S.FAILED, F.NO_CAPACITY)
    assert late.message == (
        "unschedulable for 700s (unschedulable_after = 600s): 0/3 nodes are available"
    )
    assert late.exit_code is None and late.pod == "sp-x-0-abcde"


def test_unschedulable_without_a_transition_time_counts_from_creation() -> None:
    p = kubelet.unschedulable(pod(spec={"containers": []}), "no nodes", NOW)
    (cond,) = p["status"]["conditions"]
    del cond["lastTransitionTime"]
    created = rfc3339(NOW - 1000)
    p["metadata"]["creationTimestamp"] = created
    st = index_state(job(), 0, [p], now=NOW, unschedulable_after=600)
    assert (st.state, st.failure) == (S.FAILED, F.NO_CAPACITY)


def test_a_pod_held_by_scheduling_gates_is_not_short_of_capacity() -> None:
    # https://kubernetes.io/docs/concepts/scheduling-eviction/pod-scheduling-readiness/ :
    # a gated pod has PodScheduled False with reason SchedulingGated
    p = pod(spec={"containers": [], "schedulingGates": [{"name": "example.com/wait"}]})
    kubelet.set_condition(p["status"], "PodScheduled", "False", NOW - 7200, "SchedulingGated")
    st = index_state(job(), 0, [p], now=NOW, unschedulable_after=600)
    assert (st.state, st.failure) == (S.QUEUED, None)
    assert st.message.startswith("not scheduled yet (SchedulingGated)")


def test_latest_pod_decides() -> None:
    old = kubelet.failed(RUNNING, NOW, 1)
    new = pod(
        metadata={**pod()["metadata"], "name": "b", "creationTimestamp": "2027-01-15T09:00:00Z"}
    )
    assert index_state(job(), 0, [old, kubelet.running(new, NOW)], now=NOW).state is S.RUNNING


def test_parse_indexes() -> None:
    assert parse_indexes("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}
    assert parse_indexes("") == set() and parse_indexes(None) == set()


def test_missing_outputs_are_named_from_the_exit_record() -> None:
    p = kubelet.terminated(
        RUNNING,
        1,
        "Error",
        NOW,
        message='{"stowplan": 1, "key": "k", "exit_code": 1, "missing": ["metrics.json"]}',
    )
    st = index_state(job(), 0, [p], now=NOW)
    assert (st.state, st.failure) == (S.FAILED, F.USER_ERROR)
    assert st.message == "declared output(s) missing: metrics.json"


def test_a_failed_index_with_a_live_pod_is_decided_by_the_pod() -> None:
    # the Job's status can be seen before its pod's (two watches): the pod's own status,
    # not failedIndexes, says what happens to the index while the pod lives
    j = job({"failedIndexes": "0"})
    assert index_state(j, 0, [RUNNING], now=NOW).state is S.RUNNING
    oom = index_state(j, 0, [kubelet.oom_killed(RUNNING, NOW)], now=NOW)
    assert (oom.state, oom.failure) == (S.FAILED, F.OUT_OF_MEMORY)
    # its pod deleted before it ended: preempted, whatever the last state seen of it was
    gone = index_state(j, 0, [], gone=[RUNNING], now=NOW)
    assert (gone.state, gone.failure) == (S.FAILED, F.PREEMPTED)
    deleting = {**RUNNING, "metadata": {**RUNNING["metadata"], "deletionTimestamp": "x"}}
    assert index_state(j, 0, [deleting], now=NOW).failure is F.PREEMPTED
