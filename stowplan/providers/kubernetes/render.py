"""Pure rendering of Indexed Jobs: launches in, ``KubernetesRequest`` (a Job and its ConfigMap)
out. No I/O, no clock.

Launches placed in the same node pool with the same shape (CPUs, memory, GPUs, time limit,
image, secrets) are one ``batch/v1`` Job with ``completionMode: Indexed``; completion index
``i`` runs the ``i``-th launch in key order. The per-index command, environment, files and
declared outputs are entries ``<i>.json`` of a ConfigMap of the same name, mounted read-only;
the container runs a small Python wrapper (``WRAPPER``) that reads its entry, runs the command
in ``/stowplan/work/<run>/<attempt>`` and writes an exit record to the termination message.

Retries are stowplan's: ``backoffLimitPerIndex: 0`` and a ``podFailurePolicy`` that fails the
index on any non-zero exit and on a disruption, so Kubernetes never runs an attempt twice.

Idempotency: the Job's name is ``request_name(keys)``; its annotation ``stowplan.io/keys``
lists the keys in index order, which is how a key is found again after a restart and how a
``409 AlreadyExists`` is told apart from a name clash. Secrets appear only as
``secretKeyRef`` references.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from msgspec import Struct

from stowplan.errors import ProviderError
from stowplan.placement.problem import Pool
from stowplan.providers.base import LaunchSpec, ProviderRequest, command_of, request_name
from stowplan.spec.models import K8S_IMAGE, KubernetesProviderConfig

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "stowplan"
PROVIDER_LABEL = "stowplan.io/provider"
REQUEST_LABEL = "stowplan.io/request"
KEY_LABEL = "stowplan.io/key"
"""on single-attempt Jobs only (a label holds one key)."""
KEYS_ANNOTATION = "stowplan.io/keys"
TASKS_ANNOTATION = "stowplan.io/tasks"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
CONTAINER = "main"
PARAMS_DIR = "/stowplan/params"
WORK_DIR = "/stowplan/work"
MAX_INDEXES = 1000
"""indexes per Job (a sweep larger than this is several Jobs)."""
MAX_CONFIGMAP_BYTES = 900 * 1024
"""a ConfigMap holds at most 1 MiB; a group whose entries are larger is split."""
HARDWARE_PREFIX = "kubernetes:"
"""``Pool.hardware_class`` of a node pool: ``kubernetes:LABEL=VALUE``, the node selector."""

_LABEL_VALUE = re.compile(r"\A[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")
_GPU_MODEL = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,62}\Z")

WRAPPER = """\
import base64, json, os, subprocess, sys
p = json.load(open("/stowplan/params/%s.json" % os.environ["JOB_COMPLETION_INDEX"]))
d = os.path.join("/stowplan/work", p["run_id"], str(p["attempt"]))
os.makedirs(d, exist_ok=True)
os.chdir(d)
for n, b in sorted(p["files"].items()):
    os.makedirs(os.path.dirname(n) or ".", exist_ok=True)
    open(n, "wb").write(base64.b64decode(b))
env = dict(os.environ, **p["env"])
env.update(STOWPLAN_KEY=p["key"], STOWPLAN_RUN_ID=p["run_id"],
           STOWPLAN_ATTEMPT=str(p["attempt"]), STOWPLAN_ATTEMPT_DIR=d)
try:
    rc = subprocess.call(p["argv"], env=env, stdin=subprocess.DEVNULL)
except OSError as e:
    print("stowplan: cannot run %s: %s" % (p["argv"][0], e), file=sys.stderr)
    rc = 127
rc = rc if rc >= 0 else 128 - rc
missing = [o for o in p["outputs"] if rc == 0 and not os.path.exists(o)]
for o in missing:
    print("stowplan: declared output %s is missing" % o, file=sys.stderr)
rc = 1 if missing else rc
try:
    with open("/dev/termination-log", "w") as f:
        json.dump({"stowplan": 1, "key": p["key"], "exit_code": rc, "missing": missing}, f)
except OSError:
    pass
sys.exit(rc)
"""
"""The container's program (``python3 -c``): the image must have ``python3`` (3.6 or later)."""


def label_value(text: str) -> str:
    """``text`` as a label value (at most 63 characters): itself when it is one, else a
    readable prefix and a hash."""
    if _LABEL_VALUE.match(text):
        return text
    import hashlib

    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    head = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:50].strip("-_.")
    return f"{head}-{digest}" if head and head[0].isalnum() else f"x-{digest}"


def pool_selector(pool: Pool) -> tuple[str, str] | None:
    """The node selector (label, value) of a discovered node pool, from its hardware class."""
    if not pool.hardware_class.startswith(HARDWARE_PREFIX):
        return None
    label, sep, value = pool.hardware_class[len(HARDWARE_PREFIX) :].partition("=")
    return (label, value) if sep and label and value else None


def cpu_quantity(cpus: float) -> str:
    """``1.5`` -> ``"1500m"``; whole CPUs as integers. Rounded up to a millicore."""
    milli = max(1, math.ceil(Decimal(str(cpus)) * 1000))
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def memory_quantity(memory: int) -> str:
    """Bytes as a quantity, in Mi where exact (``"1024Mi"``), else in bytes."""
    memory = max(1, memory)
    return f"{memory >> 20}Mi" if memory % (1 << 20) == 0 else str(memory)


class KubernetesRequest(ProviderRequest, frozen=True, kw_only=True):
    """One Indexed Job (``keys`` in completion-index order) and its ConfigMap of per-index
    parameters; ``name`` names both. The ConfigMap is made owned by the Job at submit (its uid
    exists only then), so deleting the Job deletes it."""

    namespace: str
    pool: str
    job: dict[str, Any]
    config_map: dict[str, Any]

    def render(self) -> str:
        return json.dumps([self.config_map, self.job], indent=2, sort_keys=True) + "\n"

    def index_of(self, key: str) -> int:
        return self.keys.index(key)


class _Group(Struct, frozen=True, array_like=True, order=True):
    pool: str
    cpus: str
    memory: str
    gpus: int
    gpu_types: tuple[str, ...]
    timeout_s: int
    image: str
    secrets: tuple[tuple[str, str, str], ...]


def _reject(provider: str, launch: LaunchSpec, why: str) -> ProviderError:
    return ProviderError(f"attempt {launch.key!r}: {why}", provider=provider, retryable=False)


def _entry(launch: LaunchSpec, argv: list[str]) -> str:
    return json.dumps(
        {
            "key": launch.key,
            "run_id": launch.run_id,
            "attempt": launch.attempt,
            "task": launch.name,
            "argv": argv,
            "env": dict(sorted(launch.env.items())),
            "outputs": list(launch.outputs),
            "files": {n: base64.b64encode(launch.files[n]).decode() for n in sorted(launch.files)},
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def plan_jobs(
    launches: Sequence[LaunchSpec],
    pools: Sequence[Pool],
    config: KubernetesProviderConfig,
    *,
    provider: str,
    namespace: str,
    prefix: str = "sp",
) -> list[KubernetesRequest]:
    """Group launches into Indexed Jobs and render each with its ConfigMap. Pure."""
    by_id = {p.id: p for p in pools}
    groups: dict[_Group, list[tuple[LaunchSpec, str]]] = {}
    for launch in launches:
        try:
            argv = command_of(launch)
        except ValueError as e:
            raise _reject(provider, launch, str(e)) from None
        image = launch.image or config.image
        if image is None:
            raise _reject(
                provider,
                launch,
                "no container image: set `image` in the task or in "
                f"[providers.{provider}] of stowplan.toml",
            )
        if not re.match(K8S_IMAGE, image):
            raise _reject(provider, launch, f"image {image!r} is not an image reference")
        for path in [*launch.files, *launch.outputs]:
            parts = path.split("/")
            if not path or path.startswith("/") or ".." in parts or "\0" in path:
                raise _reject(provider, launch, f"{path!r} must be a relative path")
        for t in launch.gpu_types:
            if not _GPU_MODEL.match(t.lower()):
                raise _reject(provider, launch, f"GPU type {t!r} is not a GPU model name")
        secrets = tuple(
            sorted((var, ref.name, ref.key or var) for var, ref in launch.secrets.items())
        )
        for var, name, key in secrets:
            if not re.match(r"\A[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z", name) or not re.match(
                r"\A[-._a-zA-Z0-9]{1,253}\Z", key
            ):
                raise _reject(
                    provider,
                    launch,
                    f"secret of {var}: {name!r}/{key!r} is not a Kubernetes Secret name and key",
                )
        group = _Group(
            pool=launch.pool,
            cpus=cpu_quantity(launch.cpus),
            memory=memory_quantity(launch.memory),
            gpus=launch.gpus,
            gpu_types=tuple(sorted(t.lower() for t in launch.gpu_types)),
            timeout_s=0 if launch.timeout_s is None else math.ceil(launch.timeout_s),
            image=image,
            secrets=secrets,
        )
        groups.setdefault(group, []).append((launch, _entry(launch, argv)))
    out: list[KubernetesRequest] = []
    for group in sorted(groups):
        members = sorted(groups[group], key=lambda m: m[0].key)
        selector = _selector(group.pool, by_id, config, provider, members[0][0])
        chunk: list[tuple[LaunchSpec, str]] = []
        size = 0
        for m in members:
            if chunk and (len(chunk) >= MAX_INDEXES or size + len(m[1]) > MAX_CONFIGMAP_BYTES):
                out.append(_render(group, chunk, selector, config, provider, namespace, prefix))
                chunk, size = [], 0
            if len(m[1]) > MAX_CONFIGMAP_BYTES:
                raise _reject(
                    provider,
                    m[0],
                    f"its command, environment and files take {len(m[1])} bytes; a Kubernetes "
                    "ConfigMap holds at most 1 MiB",
                )
            chunk.append(m)
            size += len(m[1])
        if chunk:
            out.append(_render(group, chunk, selector, config, provider, namespace, prefix))
    return out


def _selector(
    pool_id: str,
    pools: dict[str, Pool],
    config: KubernetesProviderConfig,
    provider: str,
    launch: LaunchSpec,
) -> tuple[str, str]:
    pool = pools.get(pool_id)
    sel = pool_selector(pool) if pool is not None else None
    if sel is not None:
        return sel
    name = pool_id.split("/", 1)[1] if "/" in pool_id else ""
    if config.node_pool_label is not None and name and _LABEL_VALUE.match(name):
        return config.node_pool_label, name
    raise _reject(
        provider,
        launch,
        f"pool {pool_id!r} is not a node pool this provider discovered "
        "(run discovery first, or set node_pool_label)",
    )


def _render(
    group: _Group,
    chunk: list[tuple[LaunchSpec, str]],
    selector: tuple[str, str],
    config: KubernetesProviderConfig,
    provider: str,
    namespace: str,
    prefix: str,
) -> KubernetesRequest:
    keys = tuple(launch.key for launch, _ in chunk)
    name = request_name(keys, prefix)
    n = len(chunk)
    parallelism = min(n, config.max_parallelism or n)
    labels = {
        MANAGED_BY: MANAGER,
        PROVIDER_LABEL: label_value(provider),
        REQUEST_LABEL: name,
    }
    job_labels = dict(labels)
    if n == 1:
        job_labels[KEY_LABEL] = keys[0]
    suspend = False
    if config.kueue_queue is not None:
        job_labels[KUEUE_QUEUE_LABEL] = config.kueue_queue
        suspend = True
    annotations = {
        KEYS_ANNOTATION: json.dumps(list(keys), separators=(",", ":")),
        TASKS_ANNOTATION: json.dumps(
            sorted({launch.name for launch, _ in chunk}), separators=(",", ":")
        ),
    }
    resources: dict[str, dict[str, str]] = {
        "requests": {"cpu": group.cpus, "memory": group.memory},
        "limits": {"cpu": group.cpus, "memory": group.memory},
    }
    if group.gpus:
        resources["requests"][config.gpu_resource] = str(group.gpus)
        resources["limits"][config.gpu_resource] = str(group.gpus)
    env: list[dict[str, Any]] = [
        {"name": var, "valueFrom": {"secretKeyRef": {"name": sname, "key": skey}}}
        for var, sname, skey in group.secrets
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": group.image,
        "command": ["python3", "-c", WRAPPER],
        "resources": resources,
        "volumeMounts": [
            {"name": "params", "mountPath": PARAMS_DIR, "readOnly": True},
            {"name": "work", "mountPath": WORK_DIR},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if env:
        container["env"] = env
    tolerations = [
        {"key": key, "operator": "Exists"}
        for key in sorted({config.gpu_resource, *config.tolerations})
    ]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "nodeSelector": {selector[0]: selector[1]},
        "tolerations": tolerations,
        "containers": [container],
        "volumes": [
            {"name": "params", "configMap": {"name": name}},
            {"name": "work", "emptyDir": {}},
        ],
        "enableServiceLinks": False,
    }
    if group.timeout_s:
        pod_spec["activeDeadlineSeconds"] = group.timeout_s
    if config.service_account is not None:
        pod_spec["serviceAccountName"] = config.service_account
    else:
        pod_spec["automountServiceAccountToken"] = False
    if config.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in config.image_pull_secrets]
    if config.priority_class is not None:
        pod_spec["priorityClassName"] = config.priority_class
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": n,
        "parallelism": parallelism,
        "backoffLimitPerIndex": 0,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailIndex",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
                {"action": "FailIndex", "onExitCodes": {"operator": "NotIn", "values": [0]}},
            ]
        },
        "suspend": suspend,
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if group.timeout_s:
        # a backstop: each pod has its own deadline; the Job's covers every wave of them
        waves = math.ceil(n / parallelism)
        job_spec["activeDeadlineSeconds"] = group.timeout_s * waves + 60
    if config.ttl_after_finished is not None:
        assert isinstance(config.ttl_after_finished, float)  # normalised by the config
        job_spec["ttlSecondsAfterFinished"] = math.ceil(config.ttl_after_finished)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": job_labels,
            "annotations": annotations,
        },
        "spec": job_spec,
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {KEYS_ANNOTATION: annotations[KEYS_ANNOTATION]},
        },
        "data": {f"{i}.json": entry for i, (_, entry) in enumerate(chunk)},
    }
    return KubernetesRequest(
        keys=keys,
        name=name,
        namespace=namespace,
        pool=group.pool,
        job=job,
        config_map=config_map,
    )


__all__ = ["KubernetesRequest", "label_value", "plan_jobs", "pool_selector"]
