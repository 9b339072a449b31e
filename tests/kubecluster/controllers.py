"""The control plane loops: node lifecycle (taints by condition), taint-based eviction, garbage
collection, namespace cleanup, the scheduler and the Job controller.

Theory of operation: one task on the server's loop runs :meth:`Controllers.reconcile` after
every commit until a pass writes nothing, then sleeps until the next commit or the next
deadline (a Job's activeDeadlineSeconds, a pod backoff, a taint's tolerationSeconds). Every
pass reads the whole store, so a loop is level-triggered like the upstream controllers; the
only private memory is which terminated pods a Job has already counted (upstream keeps that in
pod finalizers and ``status.uncountedTerminatedPods``).

Job semantics follow https://kubernetes.io/docs/concepts/workloads/controllers/job/ for
Kubernetes v1.31 and later (interim FailureTarget/SuccessCriteriaMet conditions before the
terminal Failed/Complete ones, backoffLimitPerIndex and podFailurePolicy GA by v1.33, success
policy GA in v1.33). What this emulator leaves out: pod termination grace periods (a deleted
pod goes at once), the job-tracking finalizer, elastic Indexed Jobs, and preemption.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from . import kubelet
from .admission import COMPLETION_INDEX, CONTROLLER_UID, INDEX_FAILURE_COUNT, JOB_NAME
from .apimachinery import (
    JSON,
    ApiError,
    format_intervals,
    parse_intervals,
    parse_quantity,
    parse_rfc3339,
    rfc3339,
)
from .emulator import FOREGROUND, JOBS, NAMESPACES, NODES, PODS, Emulator, resource_of
from .kubelet import PodOutcome

log = logging.getLogger("tests.kubecluster")

# https://kubernetes.io/docs/concepts/workloads/controllers/job/#pod-backoff-failure-policy :
# "exponential back-off delay (10s, 20s, 40s ...) capped at six minutes"
POD_BACKOFF_BASE = 10.0
POD_BACKOFF_CAP = 360.0

# https://kubernetes.io/docs/reference/labels-annotations-taints/
NOT_READY = "node.kubernetes.io/not-ready"
UNREACHABLE = "node.kubernetes.io/unreachable"
UNSCHEDULABLE = "node.kubernetes.io/unschedulable"


@dataclass
class JobBook:
    counted: set[str] = field(default_factory=set)  # pod uids already accounted for
    expected_deletions: set[str] = field(default_factory=set)  # deleted by the controller
    index_failures: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    last_failure: dict[int, float] = field(default_factory=dict)  # index (-1: job) -> time


def condition(obj: JSON, ctype: str) -> JSON | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c  # type: ignore[no-any-return]
    return None


def condition_true(obj: JSON, ctype: str) -> bool:
    c = condition(obj, ctype)
    return c is not None and c.get("status") == "True"


def tolerates(tolerations: list[JSON], taint: JSON) -> JSON | None:
    """The first toleration that tolerates ``taint``:
    https://kubernetes.io/docs/concepts/scheduling-eviction/taint-and-toleration/#concepts"""
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        op = t.get("operator") or "Equal"
        if op == "Exists":
            if not t.get("key") or t["key"] == taint.get("key"):
                return t
        elif t.get("key") == taint.get("key") and (t.get("value") or "") == (
            taint.get("value") or ""
        ):
            return t
    return None


def pod_requests(pod: JSON) -> dict[str, Decimal]:
    # https://kubernetes.io/docs/concepts/workloads/pods/init-containers/#resource-sharing-within-containers
    def total(containers: list[JSON]) -> dict[str, Decimal]:
        out: dict[str, Decimal] = defaultdict(Decimal)
        for c in containers:
            for k, v in ((c.get("resources") or {}).get("requests") or {}).items():
                out[k] += parse_quantity(v)
        return out

    spec = pod.get("spec") or {}
    app = total(spec.get("containers") or [])
    for c in spec.get("initContainers") or []:
        for k, v in total([c]).items():
            app[k] = max(app.get(k, Decimal(0)), v)
    return dict(app)


def _expr_match(expr: JSON, labels: dict[str, str]) -> bool:
    key, op, values = str(expr.get("key")), expr.get("operator"), expr.get("values") or []
    has = key in labels
    if op == "In":
        return has and labels[key] in values
    if op == "NotIn":
        return not has or labels[key] not in values
    if op == "Exists":
        return has
    if op == "DoesNotExist":
        return not has
    if op in ("Gt", "Lt") and has:
        try:
            a, b = int(labels[key]), int(values[0])
        except (ValueError, IndexError):
            return False
        return a > b if op == "Gt" else a < b
    return False


def node_selected(pod: JSON, node: JSON) -> bool:
    """nodeSelector and required node affinity:
    https://kubernetes.io/docs/concepts/scheduling-eviction/assign-pod-node/"""
    labels = node["metadata"].get("labels") or {}
    spec = pod.get("spec") or {}
    for k, v in (spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    if required:
        terms = required.get("nodeSelectorTerms") or []
        if not any(
            all(_expr_match(e, labels) for e in t.get("matchExpressions") or []) for t in terms
        ):
            return False
    return True


class Controllers:
    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.behaviour: Callable[[JSON], PodOutcome | None] | None = None
        self.books: dict[str, JobBook] = {}
        self.errors: list[BaseException] = []
        self.backoff_base = POD_BACKOFF_BASE
        self.backoff_cap = POD_BACKOFF_CAP
        self._settled_at = -1
        self._wake: float | None = None

    @property
    def now(self) -> float:
        return self.emu.clock.now()

    # -- the loop --

    async def run(self) -> None:
        store = self.emu.store
        while True:
            before = store.writes
            changed = store.change_event()
            try:
                self._wake = self.reconcile()
            except Exception as e:  # a harness bug must fail the test, not hang it
                log.exception("kubecluster: controller pass failed")
                self.errors.append(e)
                self._wake = None
            if store.writes != before:
                continue
            self._settled_at = store.writes
            timeout = None if self._wake is None else max(0.0, self._wake - self.now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)

    def settled(self) -> bool:
        return self._settled_at == self.emu.store.writes

    def reconcile(self) -> float | None:
        wakes: list[float] = []
        self.node_lifecycle()
        self.namespaces()
        self.garbage_collect()
        wakes += self.taint_eviction()
        self.schedule()
        wakes += self.jobs()
        self.emu.store.tombstones.clear()
        return min(wakes) if wakes else None

    # -- nodes --

    def node_lifecycle(self) -> None:
        """Taint nodes by condition:
        https://kubernetes.io/docs/concepts/scheduling-eviction/taint-and-toleration/#taint-nodes-by-condition
        and mark the pods of a node that stopped reporting not Ready."""
        for node in self.emu.store.all(NODES):
            ready = condition(node, "Ready")
            value = (ready or {}).get("status", "Unknown")
            want = {"False": NOT_READY, "Unknown": UNREACHABLE}.get(value)
            existing = node.get("spec", {}).get("taints") or []
            taints = [
                t for t in existing if t.get("key") not in (NOT_READY, UNREACHABLE, UNSCHEDULABLE)
            ]
            managed = [(want, "NoSchedule"), (want, "NoExecute")] if want else []
            if node.get("spec", {}).get("unschedulable"):
                managed.append((UNSCHEDULABLE, "NoSchedule"))
            for key, effect in managed:
                prev = next(
                    (t for t in existing if t.get("key") == key and t.get("effect") == effect), None
                )
                taints.append(
                    prev or {"key": key, "effect": effect, "timeAdded": rfc3339(self.now)}
                )
            if taints != (node.get("spec", {}).get("taints") or []):
                new = copy.deepcopy(node)
                if taints:
                    new["spec"]["taints"] = taints
                else:
                    new["spec"].pop("taints", None)
                self.emu.write(NODES, new)
            if value == "Unknown":
                name = node["metadata"]["name"]
                for pod in self.emu.store.all(PODS):
                    if (
                        pod["spec"].get("nodeName") == name
                        and not kubelet.is_terminal(pod)
                        and condition_true(pod, "Ready")
                    ):
                        self.emu.write(PODS, kubelet.not_ready(pod, self.now))

    def taint_eviction(self) -> list[float]:
        """Pods on a node with a NoExecute taint they do not tolerate are deleted, after the
        toleration's tolerationSeconds when it has one:
        https://kubernetes.io/docs/concepts/scheduling-eviction/taint-and-toleration/#taint-based-evictions"""
        wakes: list[float] = []
        nodes = {n["metadata"]["name"]: n for n in self.emu.store.all(NODES)}
        for pod in self.emu.store.all(PODS):
            node = nodes.get(pod["spec"].get("nodeName") or "")
            if node is None or kubelet.is_terminal(pod) or pod["metadata"].get("deletionTimestamp"):
                continue
            due: float | None = None
            for taint in node["spec"].get("taints") or []:
                if taint.get("effect") != "NoExecute":
                    continue
                tol = tolerates(pod["spec"].get("tolerations") or [], taint)
                if tol is None:
                    due = self.now
                elif tol.get("tolerationSeconds") is not None:
                    added = parse_rfc3339(taint.get("timeAdded") or rfc3339(self.now))
                    at = added + float(tol["tolerationSeconds"])
                    due = at if due is None else min(due, at)
            if due is None:
                continue
            if due <= self.now:
                self.disrupt(pod, "DeletionByTaintManager", delete=True)
            else:
                wakes.append(due)
        return wakes

    def disrupt(self, pod: JSON, reason: str, *, delete: bool, message: str = "") -> None:
        """DisruptionTarget, phase Failed, then (unless kept) the pod deleted."""
        pod = kubelet.disrupted(pod, reason, self.now, message)
        if delete:
            pod["metadata"]["deletionTimestamp"] = rfc3339(self.now)
            pod["metadata"]["deletionGracePeriodSeconds"] = 0
        pod = self.emu.write(PODS, pod)
        if delete:
            self.emu.remove(PODS, pod)

    # -- garbage collection and namespaces --

    def garbage_collect(self) -> None:
        """https://kubernetes.io/docs/concepts/architecture/garbage-collection/#owners-dependents"""
        store = self.emu.store
        uids = {o["metadata"]["uid"] for o in store.objects.values()}
        dependents: dict[str, list[tuple[tuple[str, str, str, str], JSON]]] = defaultdict(list)
        for key, obj in list(store.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            for r in refs:
                dependents[r.get("uid", "")].append((key, obj))
            # every owner is gone: background deletion of the dependent
            if (
                refs
                and not any(r.get("uid") in uids for r in refs)
                and not obj["metadata"].get("deletionTimestamp")
            ):
                self.emu.delete(resource_of(key), key[2] or None, key[3], "Background")
        for key, obj in list(store.objects.items()):
            meta = obj["metadata"]
            if not meta.get("deletionTimestamp") or FOREGROUND not in (
                meta.get("finalizers") or []
            ):
                continue
            deps = [(k, d) for k, d in dependents.get(meta["uid"], []) if k in store.objects]
            for k, d in deps:
                if not d["metadata"].get("deletionTimestamp"):
                    self.emu.delete(resource_of(k), k[2] or None, k[3], "Background")
            if not [k for k, _ in deps if k in store.objects]:
                new = copy.deepcopy(obj)
                new["metadata"]["finalizers"] = [f for f in meta["finalizers"] if f != FOREGROUND]
                if new["metadata"]["finalizers"]:
                    self.emu.write(resource_of(key), new)
                else:
                    del new["metadata"]["finalizers"]
                    self.emu.remove(resource_of(key), new)

    def namespaces(self) -> None:
        store = self.emu.store
        for ns in store.all(NAMESPACES):
            if not ns["metadata"].get("deletionTimestamp"):
                continue
            name = ns["metadata"]["name"]
            inside = [k for k in store.objects if k[2] == name]
            for k in inside:
                if not store.objects[k]["metadata"].get("deletionTimestamp"):
                    self.emu.delete(resource_of(k), name, k[3], "Background")
            if not [k for k in store.objects if k[2] == name] and not ns["metadata"].get(
                "finalizers"
            ):
                self.emu.remove(NAMESPACES, ns)

    # -- scheduler --

    def schedule(self) -> None:
        """Bind pending pods to the first node (by name) that fits: nodeSelector and required
        node affinity, NoSchedule/NoExecute taints, and resource requests against
        ``status.allocatable`` less what the node's non-terminated pods request:
        https://kubernetes.io/docs/concepts/scheduling-eviction/kube-scheduler/"""
        store = self.emu.store
        nodes = store.all(NODES)
        pods = store.all(PODS)
        used: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        for p in pods:
            n = p["spec"].get("nodeName")
            if n and not kubelet.is_terminal(p):
                for k, v in pod_requests(p).items():
                    used[n][k] += v
                used[n]["pods"] += 1
        for pod in pods:
            if (
                pod["spec"].get("nodeName")
                or kubelet.is_terminal(pod)
                or pod["metadata"].get("deletionTimestamp")
            ):
                continue
            req = pod_requests(pod)
            req["pods"] = Decimal(1)
            reasons: dict[str, int] = defaultdict(int)
            chosen = None
            for node in nodes:
                why = self._misfit(pod, node, req, used[node["metadata"]["name"]])
                if why is None:
                    chosen = node
                    break
                reasons[why] += 1
            if chosen is None:
                msg = (
                    "no nodes available to schedule pods"
                    if not nodes
                    else f"0/{len(nodes)} nodes are available: "
                    + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
                    + "."
                )
                cond = condition(pod, "PodScheduled") or {}
                if cond.get("reason") != "Unschedulable" or cond.get("message") != msg:
                    self.emu.write(PODS, kubelet.unschedulable(pod, msg, self.now))
                continue
            name = chosen["metadata"]["name"]
            for k, v in req.items():
                used[name][k] += v
            pod = self.emu.write(PODS, kubelet.scheduled(pod, name, self.now))
            if self.behaviour is not None:
                outcome = self.behaviour(copy.deepcopy(pod))
                if outcome is not None:
                    self.apply(pod, outcome)

    @staticmethod
    def _misfit(
        pod: JSON, node: JSON, req: dict[str, Decimal], used: dict[str, Decimal]
    ) -> str | None:
        if node["spec"].get("unschedulable") and not tolerates(
            pod["spec"].get("tolerations") or [], {"key": UNSCHEDULABLE, "effect": "NoSchedule"}
        ):
            return "node(s) were unschedulable"
        if not node_selected(pod, node):
            return "node(s) didn't match Pod's node affinity/selector"
        for taint in node["spec"].get("taints") or []:
            if (
                taint.get("effect") in ("NoSchedule", "NoExecute")
                and tolerates(pod["spec"].get("tolerations") or [], taint) is None
            ):
                return f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}"
        alloc = node.get("status", {}).get("allocatable") or {}
        for k, v in sorted(req.items()):
            if v == 0:
                continue
            have = parse_quantity(alloc.get(k, "0"))
            if used.get(k, Decimal(0)) + v > have:
                return "Too many pods" if k == "pods" else f"Insufficient {k}"
        return None

    def apply(self, pod: JSON, outcome: PodOutcome) -> None:
        """Make ``outcome`` happen to a scheduled pod (the test's kubelet)."""
        now = self.now
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        if outcome.kind == "wait":
            self.emu.write(
                PODS,
                kubelet.waiting(pod, outcome.reason or "ContainerCreating", now, outcome.message),
            )
            return
        if outcome.kind == "evict":
            self.disrupt(
                pod,
                outcome.reason or "EvictionByEvictionAPI",
                delete=outcome.reason != "TerminationByKubelet",
                message=outcome.message,
            )
            return
        if pod.get("status", {}).get("phase") != "Running":
            pod = self.emu.write(PODS, kubelet.running(pod, now))
        if outcome.log:
            for c in kubelet.container_names(pod)[:1]:
                self.emu.store.logs.setdefault((*key, c), []).extend(
                    outcome.log.splitlines(keepends=True)
                )
                self.emu.store.poke()
        if outcome.kind == "run":
            return
        if outcome.kind == "succeed":
            new = kubelet.succeeded(pod, now, outcome.exit_code)
        elif outcome.kind == "fail":
            new = kubelet.failed(pod, now, outcome.exit_code or 1)
        elif outcome.kind == "oom":
            new = kubelet.oom_killed(pod, now)
        else:
            raise ValueError(f"unknown pod outcome {outcome.kind!r}")
        self.emu.write(PODS, new)

    # -- Job controller --

    def jobs(self) -> list[float]:
        store = self.emu.store
        by_job: dict[str, list[JSON]] = defaultdict(list)
        for p in store.all(PODS):
            uid = (p["metadata"].get("labels") or {}).get(CONTROLLER_UID)
            if uid:
                by_job[uid].append(p)
        gone: dict[str, list[JSON]] = defaultdict(list)
        for t in store.tombstones.values():
            if t.get("kind") == "Pod":
                uid = (t["metadata"].get("labels") or {}).get(CONTROLLER_UID)
                if uid:
                    gone[uid].append(t)
        wakes: list[float] = []
        live = set()
        for job in store.all(JOBS):
            uid = job["metadata"]["uid"]
            live.add(uid)
            if condition_true(job, "Complete") or condition_true(job, "Failed"):
                continue
            wake = self.sync_job(job, by_job.get(uid, []), gone.get(uid, []))
            if wake is not None:
                wakes.append(wake)
        for uid in set(self.books) - live:
            del self.books[uid]
        return wakes

    def sync_job(self, job: JSON, pods: list[JSON], gone: list[JSON]) -> float | None:
        spec = job["spec"]
        status = copy.deepcopy(job.get("status") or {})
        uid = job["metadata"]["uid"]
        book = self.books.setdefault(uid, JobBook())
        now = self.now
        indexed = spec.get("completionMode") == "Indexed"
        completions = spec.get("completions")
        per_index = spec.get("backoffLimitPerIndex")
        completed = parse_intervals(status.get("completedIndexes"))
        failed_idx = parse_intervals(status.get("failedIndexes"))
        succeeded = int(status.get("succeeded") or 0)
        failed = int(status.get("failed") or 0)
        failure: tuple[str, str] | None = None
        wakes: list[float] = []

        # 1. account for pods that terminated or disappeared
        for p in [*pods, *gone]:
            puid = p["metadata"]["uid"]
            if puid in book.counted:
                continue
            is_gone = p in gone
            phase = p.get("status", {}).get("phase")
            if puid in book.expected_deletions and is_gone:
                book.counted.add(puid)
                continue
            if phase not in ("Succeeded", "Failed") and not is_gone:
                continue
            book.counted.add(puid)
            idx = pod_index(p) if indexed else None
            if phase == "Succeeded":
                if indexed:
                    if idx is not None and idx < (completions or 0) and idx not in failed_idx:
                        completed.add(idx)
                else:
                    succeeded += 1
                continue
            action = failure_policy_action(spec.get("podFailurePolicy"), p)
            if action is not None and action[0] == "Ignore":
                continue
            failed += 1
            if action is not None and action[0] == "FailJob":
                failure = failure or ("PodFailurePolicy", action[1])
            elif indexed and per_index is not None and idx is not None:
                book.index_failures[idx] += 1
                if (action is not None and action[0] == "FailIndex") or book.index_failures[
                    idx
                ] > per_index:
                    failed_idx.add(idx)
                else:
                    book.last_failure[idx] = now
            else:
                book.last_failure[-1 if idx is None else idx] = now
                book.index_failures[-1] += 1
        if indexed:
            succeeded = len(completed)
        active = [
            p
            for p in pods
            if not kubelet.is_terminal(p) and not p["metadata"].get("deletionTimestamp")
        ]

        # 2. suspension: https://kubernetes.io/docs/concepts/workloads/controllers/job/#suspending-a-job
        conds = status.setdefault("conditions", [])
        if spec.get("suspend"):
            self._delete_pods(active, book)
            active = []
            if not condition_true({"status": status}, "Suspended"):
                kubelet.set_condition(
                    status, "Suspended", "True", now, "JobSuspended", "Job suspended"
                )
            status.pop("startTime", None)
            self._write_status(job, status, active, pods, succeeded, failed, completed, failed_idx)
            return None
        if condition_true({"status": status}, "Suspended"):
            # "When a Job is resumed from suspension, its .status.startTime field will be reset
            # to the current time."
            kubelet.set_condition(status, "Suspended", "False", now, "JobResumed", "Job resumed")
            status["startTime"] = rfc3339(now)
        status.setdefault("startTime", rfc3339(now))

        # 3. failure criteria: https://kubernetes.io/docs/concepts/workloads/controllers/job/#job-termination-and-cleanup
        if failure is None and failed > spec.get("backoffLimit", 6):
            failure = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        deadline = spec.get("activeDeadlineSeconds")
        if failure is None and deadline is not None:
            ends = parse_rfc3339(status["startTime"]) + float(deadline)
            if now >= ends:
                failure = ("DeadlineExceeded", "Job was active longer than specified deadline")
            else:
                wakes.append(ends)
        max_failed = spec.get("maxFailedIndexes")
        if failure is None and max_failed is not None and len(failed_idx) > max_failed:
            failure = (
                "MaxFailedIndexesExceeded",
                "Job has exceeded the specified maximal number of failed indexes",
            )
        if (
            failure is None
            and indexed
            and failed_idx
            and len(completed | failed_idx) >= (completions or 0)
            and not active
        ):
            failure = ("FailedIndexes", "Job has failed indexes")

        # 4. success criteria: completions, or a success policy
        # https://kubernetes.io/docs/concepts/workloads/controllers/job/#success-policy
        success: tuple[str, str] | None = None
        if failure is None:
            rule = success_policy_rule(spec.get("successPolicy"), completed)
            if rule is not None:
                success = ("SuccessPolicy", f"Matched rules at index {rule}")
            elif (indexed and len(completed) >= (completions or 0)) or (
                not indexed
                and (
                    (completions is not None and succeeded >= completions)
                    or (completions is None and succeeded >= 1 and not active)
                )
            ):
                success = ("CompletionsReached", "Reached expected number of succeeded pods")

        # 5. terminal: interim condition, pods terminated, then the terminal condition
        # https://kubernetes.io/docs/concepts/workloads/controllers/job/#terminal-job-conditions
        if failure is not None or success is not None:
            interim, final = (
                ("FailureTarget", "Failed") if failure else ("SuccessCriteriaMet", "Complete")
            )
            reason, message = failure or success  # type: ignore[misc]
            if not condition_true({"status": status}, interim):
                kubelet.set_condition(status, interim, "True", now, reason, message)
                self._write_status(
                    job, status, active, pods, succeeded, failed, completed, failed_idx
                )
            self._delete_pods(active, book)
            kubelet.set_condition(status, final, "True", now, reason, message)
            if final == "Complete":
                status["completionTime"] = rfc3339(now)
            self._write_status(job, status, [], pods, succeeded, failed, completed, failed_idx)
            return None

        # 6. create the missing pods
        parallelism = spec.get("parallelism", 1)
        room = parallelism - len(active)
        if indexed:
            running_idx = {pod_index(p) for p in active}
            todo = [
                i
                for i in range(completions or 0)
                if i not in completed and i not in failed_idx and i not in running_idx
            ]
            for i in todo:
                if room <= 0:
                    break
                n = (
                    book.index_failures.get(i, 0)
                    if per_index is not None
                    else book.index_failures.get(-1, 0)
                )
                last = (
                    book.last_failure.get(i) if per_index is not None else book.last_failure.get(-1)
                )
                if n and last is not None:
                    ready_at = last + min(self.backoff_base * 2 ** (n - 1), self.backoff_cap)
                    if now < ready_at:
                        wakes.append(ready_at)
                        continue
                created = self._create_pod(
                    job, i, book.index_failures.get(i, 0) if per_index is not None else None
                )
                if created is not None:
                    active.append(created)
                    room -= 1
        else:
            wanted = (
                (completions - succeeded)
                if completions is not None
                else (parallelism if succeeded == 0 else 0)
            )
            want = min(parallelism, wanted) - len(active)
            n, last = book.index_failures.get(-1, 0), book.last_failure.get(-1)
            if want > 0 and n and last is not None:
                ready_at = last + min(self.backoff_base * 2 ** (n - 1), self.backoff_cap)
                if now < ready_at:
                    wakes.append(ready_at)
                    want = 0
            for _ in range(max(0, want)):
                created = self._create_pod(job, None, None)
                if created is not None:
                    active.append(created)
        if not conds:
            status.pop("conditions", None)
        self._write_status(job, status, active, pods, succeeded, failed, completed, failed_idx)
        return min(wakes) if wakes else None

    def _delete_pods(self, pods: list[JSON], book: JobBook) -> None:
        for p in pods:
            book.expected_deletions.add(p["metadata"]["uid"])
            if self.emu.store.get(PODS, p["metadata"]["namespace"], p["metadata"]["name"]):
                self.emu.delete(
                    PODS, p["metadata"]["namespace"], p["metadata"]["name"], "Background"
                )

    def _create_pod(self, job: JSON, index: int | None, failures: int | None) -> JSON | None:
        """The pod of one index as the Job controller renders it:
        https://kubernetes.io/docs/concepts/workloads/controllers/job/#completion-mode"""
        name = job["metadata"]["name"]
        pod = copy.deepcopy(job["spec"]["template"])
        meta = pod.setdefault("metadata", {})
        meta.pop("name", None)
        meta["generateName"] = f"{name}-{index}-" if index is not None else f"{name}-"
        labels = meta.setdefault("labels", {})
        labels.update(
            {
                CONTROLLER_UID: job["metadata"]["uid"],
                "controller-uid": job["metadata"]["uid"],
                JOB_NAME: name,
                "job-name": name,
            }
        )
        meta["ownerReferences"] = [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": name,
                "uid": job["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        spec = pod.setdefault("spec", {})
        if index is not None:
            labels[COMPLETION_INDEX] = str(index)
            ann = meta.setdefault("annotations", {})
            ann[COMPLETION_INDEX] = str(index)
            if failures is not None:
                ann[INDEX_FAILURE_COUNT] = str(failures)
            spec["hostname"] = f"{name}-{index}"
            for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
                c.setdefault("env", []).append(
                    {
                        "name": "JOB_COMPLETION_INDEX",
                        "valueFrom": {
                            "fieldRef": {
                                "apiVersion": "v1",
                                "fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']",
                            }
                        },
                    }
                )
        try:
            return self.emu.create(PODS, job["metadata"]["namespace"], pod)
        except ApiError as e:
            log.warning("kubecluster: job %s: pod creation failed: %s", name, e.message)
            return None

    def _write_status(
        self,
        job: JSON,
        status: JSON,
        active: list[JSON],
        pods: list[JSON],
        succeeded: int,
        failed: int,
        completed: set[int],
        failed_idx: set[int],
    ) -> None:
        spec = job["spec"]
        # omitempty integers, as the API serializes them
        for f, v in (("active", len(active)), ("succeeded", succeeded), ("failed", failed)):
            if v:
                status[f] = v
            else:
                status.pop(f, None)
        status["ready"] = sum(1 for p in active if condition_true(p, "Ready"))
        status["terminating"] = 0
        status["uncountedTerminatedPods"] = {}
        if spec.get("completionMode") == "Indexed":
            text = format_intervals(completed)
            if text:
                status["completedIndexes"] = text
            else:
                status.pop("completedIndexes", None)
            if spec.get("backoffLimitPerIndex") is not None:
                status["failedIndexes"] = format_intervals(failed_idx)
        if not status.get("conditions"):
            status.pop("conditions", None)
        current = self.emu.store.get(JOBS, job["metadata"]["namespace"], job["metadata"]["name"])
        if current is None or current.get("status") == status:
            return
        new = copy.deepcopy(current)
        new["status"] = copy.deepcopy(status)
        self.emu.write(JOBS, new)


def pod_index(pod: JSON) -> int | None:
    v = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX)
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def failure_policy_action(policy: JSON | None, pod: JSON) -> tuple[str, str] | None:
    """The first matching rule's (action, message):
    https://kubernetes.io/docs/concepts/workloads/controllers/job/#pod-failure-policy

    onExitCodes looks at terminated containers with a non-zero exit code (restricted to
    ``containerName`` when given); onPodConditions at the pod's conditions (status defaults to
    True)."""
    if not policy:
        return None
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    st = pod.get("status") or {}
    statuses = (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or [])
    for i, rule in enumerate(policy.get("rules") or []):
        codes = rule.get("onExitCodes")
        if codes is not None:
            for cs in statuses:
                if codes.get("containerName") and cs.get("name") != codes["containerName"]:
                    continue
                term = (cs.get("state") or {}).get("terminated")
                if not term or term.get("exitCode", 0) == 0:
                    continue
                code = term["exitCode"]
                inside = code in (codes.get("values") or [])
                if inside == (codes.get("operator") == "In"):
                    return rule["action"], (
                        f"Container {cs['name']} for pod {ns}/{name} failed with exit code "
                        f"{code} matching {rule['action']} rule at index {i}"
                    )
        for pattern in rule.get("onPodConditions") or []:
            c = condition(pod, pattern.get("type", ""))
            if c is not None and c.get("status") == pattern.get("status", "True"):
                return rule["action"], (
                    f"Pod {ns}/{name} has condition {pattern['type']} matching "
                    f"{rule['action']} rule at index {i}"
                )
    return None


def success_policy_rule(policy: JSON | None, completed: set[int]) -> int | None:
    if not policy:
        return None
    for i, rule in enumerate(policy.get("rules") or []):
        wanted = parse_intervals(rule["succeededIndexes"]) if rule.get("succeededIndexes") else None
        count = rule.get("succeededCount")
        have = len(completed & wanted) if wanted is not None else len(completed)
        if wanted is not None and count is None and wanted <= completed:
            return i
        if count is not None and have >= count:
            return i
    return None
