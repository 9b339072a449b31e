"""Pure rendering of Indexed Jobs: launches in, ``KubernetesRequest`` (a Job and its ConfigMap)
out. No I/O, no clock.

Launches placed in the same node pool with the same shape (CPUs, memory, GPUs, time limit,
image, secrets) are one ``batch/v1`` Job with ``completionMode: Indexed``; completion index
``i`` runs the ``i``-th launch in key order. The per-index command, environment, files and
declared outputs are entries ``<i>.json`` of a ConfigMap of the same name, mounted read-only;
the container runs a small Python wrapper (``WRAPPER``) that reads its entry, runs the command
in ``/stowplan/work/<run>/<attempt>`` and writes an exit record to the termination message.

With ``bucket`` (``s3://BUCKET/PREFIX``), outputs and logs come back through S3 in the AWS
driver's layout (``slots_of``): each entry names the objects its pod PUTs (its declared
outputs, stdout, stderr, the exit record) as ``urls``, shown here as placeholders
``<presigned at submit: PUT s3://...>``; presigning needs the clock and the credentials, so
the driver fills them at submit (``KubernetesRequest.with_urls``) and a pod needs no
credentials. The URLs stay valid for the Job's deadline plus ``LEASE_MARGIN_S`` (7 days
without a timeout); their size is counted when entries are packed into ConfigMaps.

Retries are stowplan's: ``backoffLimitPerIndex: 0`` and a ``podFailurePolicy`` that fails the
index on any non-zero exit and on a disruption, so Kubernetes never runs an attempt twice.

Device leases: a launch with a ``DeviceLease`` naming a node (a pool that describes its devices,
``discover.py``) goes to that node: its pod has a *required* node affinity on
``kubernetes.io/hostname`` (never ``nodeName``, which would bypass the scheduler and the device
plugin's admission), beside the pool's node selector, and requests as many GPUs as the lease
holds devices (none for a CPU-only run). Where the pool's nodes time-slice their GPUs
(``PoolDevices.slices``), it requests replicas instead: a share of one GPU in whole replicas,
a whole GPU all of one's (``gpu_request``). The device plugin binds the devices; the pod template
records the lease of each completion index in ``DEVICES_ANNOTATION``, which discovery reads
back. Launches are grouped by their lease's node too.

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
from typing import Any, NamedTuple

from msgspec import Struct, field

from stowplan.errors import ProviderError
from stowplan.placement.leases import MILLI
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
HOSTNAME_LABEL = "kubernetes.io/hostname"
"""the label a lease's node is pinned by (``DeviceLease.node`` is its value)."""
DEVICES_ANNOTATION = "stowplan.io/devices"
"""on a Job's pod template: ``{"node": NODE, "devices": [[i, ...] per completion index]}``."""
CONTAINER = "main"
PARAMS_DIR = "/stowplan/params"
WORK_DIR = "/stowplan/work"
MAX_INDEXES = 1000
"""indexes per Job (a sweep larger than this is several Jobs)."""
MAX_CONFIGMAP_BYTES = 900 * 1024
"""a ConfigMap holds at most 1 MiB; a group whose entries are larger is split."""
TERMINATION_LOG = "/dev/termination-log"
LOG_EVERY_S = 15
"""seconds between the wrapper's uploads of the logs while the command runs (with a bucket)."""
LEASE_MAX_S = 7 * 86400
"""the longest a presigned URL is valid (SigV4)."""
LEASE_MARGIN_S = 3600
"""lease beyond the Job's own deadline: waiting for a node, uploading outputs."""
URL_BYTES = 2048
"""what a presigned URL may take in a ConfigMap entry (with a session token: about 1.5 KB)."""
HARDWARE_PREFIX = "kubernetes:"
"""``Pool.hardware_class`` of a node pool: ``kubernetes:LABEL=VALUE``, the node selector."""

_LABEL_VALUE = re.compile(r"\A[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")
_GPU_MODEL = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,62}\Z")

WRAPPER = r"""
import base64, json, os, signal, subprocess, sys, tarfile, threading, time
import urllib.error, urllib.request
params, work, term = sys.argv[1:4]
p = json.load(open(os.path.join(params, "%s.json" % os.environ["JOB_COMPLETION_INDEX"])))
urls = p.get("urls") or {}
d = os.path.join(work, p["run_id"], str(p["attempt"]))
m = os.path.join(work, ".stowplan", p["run_id"], str(p["attempt"]))
for x in (d, m):
    os.makedirs(x, exist_ok=True)
os.chdir(d)
here = os.path.realpath(d)
started = time.time()
def put(slot, path, tries=4):
    u = urls.get(slot)
    if not u:
        return True
    for i in range(tries):
        try:
            with open(path, "rb") as f:
                h = {"Content-Length": str(os.fstat(f.fileno()).st_size),
                     "Content-Type": "application/octet-stream"}
                r = urllib.request.Request(u, data=f, headers=h, method="PUT")
                urllib.request.urlopen(r, timeout=300).close()
            return True
        except (OSError, urllib.error.URLError) as e:
            why = e
            c = getattr(e, "code", None)
            if c is not None and c not in (408, 429) and c < 500 or i + 1 == tries:
                break
            time.sleep(2 ** i)
    if tries > 1:  # NOTE: the error, never the URL (it is a capability)
        print("stowplan: cannot upload %s: %s" % (slot, why), file=sys.stderr)
    return False
for n, b in sorted(p["files"].items()):
    os.makedirs(os.path.dirname(n) or ".", exist_ok=True)
    open(n, "wb").write(base64.b64decode(b))
env = dict(os.environ, **p["env"])
env.update(STOWPLAN_KEY=p["key"], STOWPLAN_RUN_ID=p["run_id"],
           STOWPLAN_ATTEMPT=str(p["attempt"]), STOWPLAN_ATTEMPT_DIR=d)
logs = {s: os.path.join(m, s) for s in ("stdout", "stderr")}
def tee(src, sink, path):
    with open(path, "ab") as f:
        while True:
            b = os.read(src, 65536)
            if not b:
                return
            f.write(b)
            f.flush()
            try:
                sink.write(b)
                sink.flush()
            except (OSError, ValueError):
                pass
stop = threading.Event()
def push():
    while not stop.wait(p.get("log_every") or 15):
        for s in logs:
            put(s, logs[s], 1)
reason = "exit"
try:
    proc = subprocess.Popen(p["argv"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
except OSError as e:
    open(logs["stderr"], "a").write("stowplan: cannot run %s: %s\n" % (p["argv"][0], e))
    print("stowplan: cannot run %s: %s" % (p["argv"][0], e), file=sys.stderr)
    open(logs["stdout"], "a").close()
    rc = 127
else:
    signal.signal(signal.SIGTERM, lambda *a: proc.terminate())
    ts = [threading.Thread(target=tee, args=(proc.stdout.fileno(), sys.stdout.buffer,
                                              logs["stdout"]), daemon=True),
          threading.Thread(target=tee, args=(proc.stderr.fileno(), sys.stderr.buffer,
                                              logs["stderr"]), daemon=True)]
    if urls:
        ts.append(threading.Thread(target=push, daemon=True))
    for t in ts:
        t.start()
    rc = proc.wait()
    stop.set()
    for t in ts:
        t.join(10)
    rc = rc if rc >= 0 else 128 - rc
    reason = "terminated" if rc == 143 else "exit"
missing = []
for i, o in enumerate(p["outputs"] if rc == 0 else []):
    name, isdir = o.rstrip("/"), o.endswith("/")
    real = os.path.realpath(name)
    if not os.path.exists(name) or isdir != os.path.isdir(name):
        why = "is missing" if not os.path.exists(name) else (
            "is not a directory" if isdir else "is a directory (declare it as %s/)" % name)
    elif not real.startswith(here + os.sep):
        why = "leads outside the attempt directory"
    else:
        why = ""
        path = name
        if isdir and urls:
            path = os.path.join(m, "output_%d.tar.gz" % i)
            with tarfile.open(path, "w:gz") as t:
                t.add(name, arcname=name)
        if not put("output_%d" % i, path):
            rc, reason = 70, "setup"
    if why:
        print("stowplan: declared output %s %s" % (o, why), file=sys.stderr)
        open(logs["stderr"], "a").write("stowplan: declared output %s %s\n" % (o, why))
        missing.append(o)
if missing:
    rc, reason = 1, "outputs"
for s in logs:
    put(s, logs[s])
rec = {"stowplan": 1, "key": p["key"], "exit_code": rc, "reason": reason, "missing": missing,
       "started_at": started, "ended_at": time.time()}
open(os.path.join(m, "exit.json"), "w").write(json.dumps(rec))
put("exit", os.path.join(m, "exit.json"))
try:
    with open(term, "w") as f:
        json.dump(rec, f)
except OSError:
    pass
sys.exit(rc)
"""
"""The container's program (``python3 -c WRAPPER PARAMS_DIR WORK_DIR TERMINATION_LOG``),
standard library only: the image must have ``python3`` (3.6 or later).

It runs the index's argv (a list: no shell) in ``WORK_DIR/RUN/ATTEMPT`` with its environment,
copies the command's stdout and stderr to the container's log and to files, and, with a
bucket, PUTs each declared output (a directory ``d/`` as a gzipped tar of ``d``), the two logs
(also every ``log_every`` seconds while it runs) and the exit record to the presigned URLs of
its entry. An output that cannot be uploaded makes the attempt fail with exit code 70, reason
``setup`` (an infrastructure failure); a log or the exit record that cannot be uploaded is
only said in the log. The exit record also goes to the termination message."""


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
    bucket: str = ""
    """the bucket's name ("" without one)."""
    slots: dict[str, dict[str, str]] = field(default_factory=dict)
    """key -> URL slot (``stdout``, ``stderr``, ``exit``, ``output_I``) -> the S3 object key
    it is PUT to; the ConfigMap shows each URL as ``<presigned at submit: PUT s3://...>``."""
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    """key -> declared output -> its S3 object key."""
    lease_s: int = LEASE_MAX_S
    """how long the presigned URLs stay valid."""

    def render(self) -> str:
        return json.dumps([self.config_map, self.job], indent=2, sort_keys=True) + "\n"

    def with_urls(self, urls: dict[str, dict[str, str]]) -> dict[str, Any]:
        """The ConfigMap as created: each entry's placeholders replaced by ``urls[key]``."""
        data = {}
        for name, text in self.config_map["data"].items():
            entry = json.loads(text)
            if "urls" in entry:
                entry["urls"] = {slot: urls[entry["key"]][slot] for slot in entry["urls"]}
            data[name] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
        return {**self.config_map, "data": data}

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
    node: str = ""
    """the node its leases name ("" for none): its pods are pinned there."""


def gpu_request(launch: LaunchSpec, pool: Pool | None) -> int:
    """How many of ``gpu_resource`` the pod asks for: the launch's GPUs; where the pool's
    nodes time-slice them (``PoolDevices.slices`` replicas each), replicas: a share of one
    GPU in whole replicas, rounded up, and a whole GPU every replica of one."""
    devices = pool.devices if pool is not None else None
    if not launch.gpus or devices is None or devices.slices <= 1:
        return launch.gpus
    if launch.gpus == 1 and 0 < launch.gpu_milli < MILLI:
        return devices.share_slices(launch.gpu_milli)
    return launch.gpus * devices.slices


def _reject(provider: str, launch: LaunchSpec, why: str) -> ProviderError:
    return ProviderError(f"attempt {launch.key!r}: {why}", provider=provider, retryable=False)


def attempt_prefix(config: KubernetesProviderConfig, run_id: str, key: str) -> str:
    """The S3 key prefix of one attempt's objects (no trailing slash): the AWS driver's
    layout, so the store reads both alike."""
    base = config.bucket_prefix + "/" if config.bucket_prefix else ""
    return f"{base}attempts/{run_id}/{key}"


def slots_of(
    config: KubernetesProviderConfig, run_id: str, key: str, outputs: Sequence[str]
) -> dict[str, str]:
    """URL slot -> S3 object key, under ``bucket``::

    PREFIX/attempts/RUN/KEY/stdout, stderr   the command's logs
    PREFIX/attempts/RUN/KEY/outputs/PATH     each declared output (a directory: PATH.tar.gz)
    PREFIX/exit/RUN/KEY.json                 the exit record
    """
    here = attempt_prefix(config, run_id, key)
    base = config.bucket_prefix + "/" if config.bucket_prefix else ""
    slots = {
        "stdout": f"{here}/stdout",
        "stderr": f"{here}/stderr",
        "exit": f"{base}exit/{run_id}/{key}.json",
    }
    for i, out in enumerate(outputs):
        tail = ".tar.gz" if out.endswith("/") else ""
        slots[f"output_{i}"] = f"{here}/outputs/{out.removesuffix('/')}{tail}"
    return slots


def _entry(launch: LaunchSpec, argv: list[str], bucket: str, slots: dict[str, str]) -> str:
    entry: dict[str, Any] = {
        "key": launch.key,
        "run_id": launch.run_id,
        "attempt": launch.attempt,
        "task": launch.name,
        "argv": argv,
        "env": dict(sorted(launch.env.items())),
        "outputs": list(launch.outputs),
        "files": {n: base64.b64encode(launch.files[n]).decode() for n in sorted(launch.files)},
    }
    if slots:
        entry["urls"] = {
            slot: f"<presigned at submit: PUT s3://{bucket}/{obj}>" for slot, obj in slots.items()
        }
        entry["log_every"] = LOG_EVERY_S
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


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
    slots: dict[str, dict[str, str]] = {}
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
        for path in [*launch.files, *(o.removesuffix("/") for o in launch.outputs)]:
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
        lease = launch.lease
        if lease is not None and lease.devices and len(lease.devices) != launch.gpus:
            raise _reject(
                provider,
                launch,
                f"it asks for {launch.gpus} GPUs but its lease holds devices "
                f"{list(lease.devices)} of node {lease.node!r}",
            )
        if lease is not None and lease.node and not _LABEL_VALUE.match(lease.node):
            raise _reject(provider, launch, f"node {lease.node!r} is not a label value")
        group = _Group(
            pool=launch.pool,
            cpus=cpu_quantity(launch.cpus),
            memory=memory_quantity(launch.memory),
            gpus=gpu_request(launch, by_id.get(launch.pool)),
            gpu_types=tuple(sorted(t.lower() for t in launch.gpu_types)),
            timeout_s=0 if launch.timeout_s is None else math.ceil(launch.timeout_s),
            image=image,
            secrets=secrets,
            node=lease.node if lease is not None else "",
        )
        if config.bucket is not None:
            slots[launch.key] = slots_of(config, launch.run_id, launch.key, launch.outputs)
        entry = _entry(launch, argv, config.bucket_name, slots.get(launch.key, {}))
        groups.setdefault(group, []).append((launch, entry))
    out: list[KubernetesRequest] = []
    for group in sorted(groups):
        members = sorted(groups[group], key=lambda m: m[0].key)
        selector = _selector(group.pool, by_id, config, provider, members[0][0])
        chunk: list[tuple[LaunchSpec, str]] = []
        size = 0
        for m in members:
            # NOTE: a placeholder becomes a presigned URL at submit: count the URL's size
            weight = len(m[1]) + URL_BYTES * len(slots.get(m[0].key, ()))
            if chunk and (len(chunk) >= MAX_INDEXES or size + weight > MAX_CONFIGMAP_BYTES):
                out.append(
                    _render(group, chunk, selector, config, provider, namespace, prefix, slots)
                )
                chunk, size = [], 0
            if weight > MAX_CONFIGMAP_BYTES:
                raise _reject(
                    provider,
                    m[0],
                    f"its command, environment and files take {weight} bytes; a Kubernetes "
                    "ConfigMap holds at most 1 MiB",
                )
            chunk.append(m)
            size += weight
        if chunk:
            out.append(_render(group, chunk, selector, config, provider, namespace, prefix, slots))
    return out


class _Target(NamedTuple):
    """Where a group's pods go: the node-pool label and value, and the pool's taint keys
    (``Pool.taints``), which the pods tolerate: placement sends a task to a tainted pool only
    when its ``placement.tolerations`` hold them all."""

    label: str
    value: str
    taints: tuple[str, ...] = ()


def _selector(
    pool_id: str,
    pools: dict[str, Pool],
    config: KubernetesProviderConfig,
    provider: str,
    launch: LaunchSpec,
) -> _Target:
    pool = pools.get(pool_id)
    sel = pool_selector(pool) if pool is not None else None
    if sel is not None:
        assert pool is not None
        return _Target(sel[0], sel[1], pool.taints)
    name = pool_id.split("/", 1)[1] if "/" in pool_id else ""
    if config.node_pool_label is not None and name and _LABEL_VALUE.match(name):
        return _Target(config.node_pool_label, name)
    raise _reject(
        provider,
        launch,
        f"pool {pool_id!r} is not a node pool this provider discovered "
        "(run discovery first, or set node_pool_label)",
    )


def pin_to_node(pod_spec: dict[str, Any], node: str) -> None:
    """Require ``node`` (its ``kubernetes.io/hostname``) in ``pod_spec``'s node affinity, in
    every term it already has (terms are ORed: each must pin), beside its node selector."""
    expr = {"key": HOSTNAME_LABEL, "operator": "In", "values": [node]}
    affinity = pod_spec.setdefault("affinity", {}).setdefault("nodeAffinity", {})
    required = affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    for term in terms:
        term["matchExpressions"] = [*(term.get("matchExpressions") or []), expr]
    required["nodeSelectorTerms"] = terms


def _render(
    group: _Group,
    chunk: list[tuple[LaunchSpec, str]],
    selector: _Target,
    config: KubernetesProviderConfig,
    provider: str,
    namespace: str,
    prefix: str,
    slots: dict[str, dict[str, str]],
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
        "command": ["python3", "-c", WRAPPER, PARAMS_DIR, WORK_DIR, TERMINATION_LOG],
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
        for key in sorted({config.gpu_resource, *config.tolerations, *selector.taints})
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
    template_meta: dict[str, Any] = {"labels": labels}
    if group.node:
        pin_to_node(pod_spec, group.node)
        leases = [launch.lease.devices if launch.lease else () for launch, _ in chunk]
        template_meta["annotations"] = {
            DEVICES_ANNOTATION: json.dumps(
                {"node": group.node, "devices": [list(d) for d in leases]},
                separators=(",", ":"),
            )
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
        "template": {"metadata": template_meta, "spec": pod_spec},
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
    waves = math.ceil(n / parallelism)
    lease = LEASE_MAX_S
    if group.timeout_s:
        lease = min(LEASE_MAX_S, group.timeout_s * waves + 60 + LEASE_MARGIN_S)
    mine = {k: slots[k] for k in keys if k in slots}
    return KubernetesRequest(
        keys=keys,
        name=name,
        namespace=namespace,
        pool=group.pool,
        job=job,
        config_map=config_map,
        bucket=config.bucket_name if mine else "",
        slots=mine,
        outputs={
            launch.key: {o: mine[launch.key][f"output_{i}"] for i, o in enumerate(launch.outputs)}
            for launch, _ in chunk
            if launch.key in mine
        },
        lease_s=lease,
    )


__all__ = [
    "KubernetesRequest",
    "attempt_prefix",
    "label_value",
    "pin_to_node",
    "plan_jobs",
    "pool_selector",
    "slots_of",
]
