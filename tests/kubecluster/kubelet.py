"""What a kubelet would report about a pod: pure functions from a pod to its next status.

The tests decide what happens to a container (it runs, exits with a code, is OOM killed, cannot
pull its image, is evicted); these functions write the status the way the kubelet and the
control plane report it:
https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/
https://kubernetes.io/docs/concepts/workloads/pods/disruptions/#pod-disruption-conditions
"""

from __future__ import annotations

import base64
import contextlib
import copy
import os
import re
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


class ProcessKubelet:
    """A kubelet that really runs each pod's container, as a local process: a pod behaviour
    (``KubeCluster.set_pod_behaviour(ProcessKubelet(cluster, root))``).

    What it emulates, after https://kubernetes.io/docs/concepts/storage/volumes/ and
    https://kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure/ :
    the pod's volumes are directories under ``root/<pod>/`` (a ``configMap`` volume holds one
    file per data key, an ``emptyDir`` starts empty); there is no container filesystem, so an
    element of the container's ``command``/``args`` that is exactly a volume's ``mountPath`` or
    the ``terminationMessagePath`` (default ``/dev/termination-log``) is replaced by its
    directory or file, and ``python3`` by this interpreter. The environment is the
    container's ``env`` (``value``, ``fieldRef`` to the pod's metadata, ``secretKeyRef`` read
    from the Secret) over this process's own (``base_env``: what the image would set, such as
    ``PATH``). stdout and stderr go to the container's log as they come. When the process
    ends the container is terminated with its exit code (reason ``Completed`` or ``Error``) and
    the termination message file's first 4096 bytes. A pod deleted while its process runs has
    the process killed. Only the first container runs (the driver renders one).
    """

    def __init__(
        self, cluster: Any, root: Path, *, base_env: Mapping[str, str] | None = None
    ) -> None:
        self.cluster = cluster
        self.root = Path(root)
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.errors: list[BaseException] = []
        self.ran: list[str] = []
        self._threads: list[threading.Thread] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def __call__(self, pod: JSON) -> PodOutcome:
        # NOTE: called on the emulator's loop: the process is started from a thread of its own
        t = threading.Thread(target=self._guarded, args=(copy.deepcopy(pod),), daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()
        return PodOutcome("run")

    def close(self, timeout: float = 30.0) -> None:
        """Kill what still runs and wait for the threads; raise the first error seen."""
        with self._lock:
            procs = list(self._procs.values())
            threads = list(self._threads)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for t in threads:
            t.join(timeout)
        if self.errors:
            raise RuntimeError(f"ProcessKubelet: {self.errors[0]!r}") from self.errors[0]

    def _guarded(self, pod: JSON) -> None:
        try:
            self._run(pod)
        except BaseException as e:  # NOTE: reported by close(), not lost in a thread
            self.errors.append(e)

    def _resource(self, plural: str, ns: str, name: str) -> JSON | None:
        got: JSON | None = self.cluster.get(plural, name, ns)
        return got

    def _env(self, pod: JSON, container: JSON) -> dict[str, str]:
        env = dict(self.base_env)
        ns = pod["metadata"]["namespace"]
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = str(var["value"])
                continue
            src = var.get("valueFrom") or {}
            if "fieldRef" in src:
                path = src["fieldRef"]["fieldPath"]
                m = re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", path)
                if m:
                    env[var["name"]] = pod["metadata"].get(m.group(1), {}).get(m.group(2), "")
                elif path in ("metadata.name", "metadata.namespace"):
                    env[var["name"]] = pod["metadata"][path.split(".")[1]]
                else:
                    raise ValueError(f"fieldRef {path!r} is not emulated")
            elif "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                secret = self._resource("secrets", ns, ref["name"]) or {}
                raw = (secret.get("data") or {}).get(ref["key"])
                if raw is None:
                    raise ValueError(f"secret {ref['name']}/{ref['key']} not found")
                env[var["name"]] = base64.b64decode(raw).decode()
            else:
                raise ValueError(f"env source {sorted(src)} is not emulated")
        return env

    def _run(self, pod: JSON) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name = meta["namespace"], meta["name"]
        container = spec["containers"][0]
        home = self.root / name
        volumes: dict[str, Path] = {}
        for vol in spec.get("volumes") or []:
            d = home / "volumes" / vol["name"]
            d.mkdir(parents=True)
            if "configMap" in vol:
                cm = self._resource("configmaps", ns, vol["configMap"]["name"])
                if cm is None:
                    raise ValueError(f"configMap {vol['configMap']['name']} not found")
                for key, text in (cm.get("data") or {}).items():
                    (d / key).write_text(text)
            elif "emptyDir" not in vol:
                raise ValueError(f"volume {vol['name']}: only configMap and emptyDir emulated")
        paths = {
            m["mountPath"]: str(volumes.setdefault(m["name"], home / "volumes" / m["name"]))
            for m in container.get("volumeMounts") or []
        }
        term = home / "termination-log"
        paths[container.get("terminationMessagePath") or "/dev/termination-log"] = str(term)
        paths["python3"] = sys.executable
        argv = [paths.get(a, a) for a in [*container["command"], *(container.get("args") or [])]]
        proc = subprocess.Popen(
            argv,
            env=self._env(pod, container),
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        with self._lock:
            self._procs[name] = proc
            self.ran.append(name)
        reader = threading.Thread(target=self._copy_log, args=(proc, name, ns), daemon=True)
        reader.start()
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                cur = self._resource("pods", ns, name)
                if cur is None or (cur.get("metadata") or {}).get("deletionTimestamp"):
                    proc.kill()  # the pod is going: so is its container
        reader.join(30)
        with self._lock:
            self._procs.pop(name, None)
        rc = rc if rc >= 0 else 128 - rc
        message = term.read_bytes()[:4096].decode(errors="replace") if term.exists() else ""
        self._terminate(name, ns, rc, message)

    def _terminate(self, name: str, ns: str, rc: int, message: str) -> None:
        from .store import RESOURCES

        pods = RESOURCES[("", "pods")]
        cluster = self.cluster

        def go() -> None:
            cur = cluster.emulator.store.get(pods, ns, name)
            if cur is None or is_terminal(cur):
                return  # deleted, or ended otherwise (evicted, deadline) meanwhile
            reason = "Completed" if rc == 0 else "Error"
            now = cluster.controllers.now
            cluster.emulator.write(pods, terminated(copy.deepcopy(cur), rc, reason, now, message))

        cluster._call(go)  # NOTE: the cluster's own way to act on its loop

    def _copy_log(self, proc: subprocess.Popen[bytes], name: str, ns: str) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(Exception):  # NOTE: the pod may be gone already
                self.cluster.write_log(name, line.decode(errors="replace"), namespace=ns)
