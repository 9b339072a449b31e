"""Pure discovery: nodes and pods (as the API returns them) in, node pools out. No I/O.

A pool is the set of schedulable nodes sharing a node-pool label value. Its capacity is what
the nodes' ``status.allocatable`` leaves after the requests of the pods running there
(allocatable is the truth: a node labelled with a GPU model but with 0 allocatable GPUs has a
broken driver or device plugin, and is left out). Cordoned (``spec.unschedulable``) and
NotReady nodes are left out too; every node left out is named in the notes.

Taints: a ``NoSchedule``/``NoExecute`` taint that every stowplan pod tolerates (the provider's
``tolerations`` and ``gpu_resource``) is ignored; any other taint key becomes one of the pool's
``taints``, which placement offers only to tasks whose ``placement.tolerations`` hold every
one (and whose pods then tolerate them). A pool's taints are those of all its nodes.

Devices: a pool that is not autoscaled and has GPU nodes describes its GPUs by node and device
(``Pool.devices``), so the scheduler core places each run on one node and device indices (its
``DeviceLease``) and the pod is pinned to that node (``render.py``). A node is named by its
``kubernetes.io/hostname`` label (else its name), which the pin selects; its devices are its
allocatable GPUs, whole. A node whose device plugin time-slices its GPUs (GPU feature
discovery's ``nvidia.com/gpu.replicas`` above 1) allocates replicas: its devices are its
allocatable over its replicas, and the pool shares them (``PoolDevices.sharing``) in slices of
one replica (``PoolDevices.slices``): a share of one GPU holds whole replicas and a whole GPU
all of one's (``render.gpu_request``). A pool whose nodes have different replicas offers no
GPUs, and says so. Kubernetes does not say which devices a pod holds (the device plugin picks
them; with time-slicing, even which device a replica is of), so the GPUs other pods request
are modelled as the first devices that no lease of stowplan's names; the devices of this
provider's own pods are their leases (the ``DEVICES_ANNOTATION`` their Job records), left free
here because the core holds them.

Own pods: the pods of the Jobs in ``own_jobs`` (the driver's: it submitted them or found their
keys) hold what the core leases to their runs, and the core subtracts its leases itself
(``PoolsDiscovered``: capacity *for stowplan*), so they are not subtracted here; a pod being
deleted is, since its run's lease is already given back.

Autoscaled pools (``autoscale`` in the provider's config) are elastic: their ``node`` is the
configured shape, ``max_instances`` the configured maximum less the nodes the pool has now (in
any state), ``boot_s`` the configured boot time. They are offered also when no node of theirs
exists (scale from zero); the cluster's autoscaler, not stowplan, adds the nodes when pods
wait for them.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from msgspec import Struct, field

from stowplan.placement.leases import MILLI, NodeDevices, PoolDevices
from stowplan.placement.problem import Pool, Shape
from stowplan.providers.kubernetes.render import (
    DEVICES_ANNOTATION,
    GPU_PRODUCT_LABEL,
    HARDWARE_PREFIX,
    HOSTNAME_LABEL,
    JOB_NAME_LABEL,
)
from stowplan.providers.kubernetes.states import pod_index
from stowplan.spec.models import KubernetesAutoscaleSpec

POOL_LABELS = (
    "cloud.google.com/gke-nodepool",
    "eks.amazonaws.com/nodegroup",
    "karpenter.sh/nodepool",
    "node.kubernetes.io/instance-type",
)
"""The node-pool labels looked for, in this order, when ``node_pool_label`` is not set."""
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
REPLICAS_LABEL = "nvidia.com/gpu.replicas"
"""GPU feature discovery's replicas of each GPU: above 1 where the device plugin time-slices
them (its allocatable GPUs are then replicas; NVIDIA/k8s-device-plugin,
docs/gpu-feature-discovery/README.md)."""

_SUFFIX: dict[str, Decimal] = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
    "Ki": Decimal(1 << 10),
    "Mi": Decimal(1 << 20),
    "Gi": Decimal(1 << 30),
    "Ti": Decimal(1 << 40),
    "Pi": Decimal(1 << 50),
    "Ei": Decimal(1 << 60),
}
_QUANTITY = re.compile(r"\A([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE]?)\Z")
_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro", "rtx", "datacenter"}


def parse_quantity(text: object) -> Decimal:
    """A Kubernetes quantity (``"500m"``, ``"32Gi"``, ``"1e3"``, ``8``) as a number; anything
    unreadable is 0."""
    m = _QUANTITY.match(str(text).strip())
    if not m:
        return Decimal(0)
    try:
        return Decimal(m.group(1)) * _SUFFIX[m.group(2)]
    except InvalidOperation:
        return Decimal(0)


def gpu_model_of(product: str) -> str:
    """NVIDIA GPU feature discovery's ``nvidia.com/gpu.product`` in the GPU vocabulary of
    stowplan's specs, the simulator and Slurm GRES types: the lowercase model word.

    ``NVIDIA-A100-SXM4-40GB`` -> ``a100``, ``Tesla-V100-SXM2-16GB`` -> ``v100``,
    ``NVIDIA-H100-80GB-HBM3`` -> ``h100``, ``Tesla-T4`` -> ``t4``, ``NVIDIA-L4`` -> ``l4``,
    ``NVIDIA-A10G`` -> ``a10g``, ``NVIDIA-GeForce-RTX-4090`` -> ``rtx4090``,
    ``NVIDIA-A100-SXM4-40GB-SHARED`` (time-slicing) -> ``a100``."""
    words = [w for w in re.split(r"[-_\s]+", product.strip().lower()) if w]
    rtx = "rtx" in words
    for w in words:
        if w in _VENDOR_WORDS:
            continue
        if any(c.isdigit() for c in w) and any(c.isalpha() for c in w):
            return w
        if w.isdigit() and rtx:
            return f"rtx{w}"
    rest = [w for w in words if w not in _VENDOR_WORDS]
    return rest[0] if rest else "unknown"


def replicas_of(labels: Mapping[str, str]) -> int | None:
    """The replicas of each GPU a node's device plugin hands out (``REPLICAS_LABEL``): 1 where
    the label is absent; None where it is not a positive whole number."""
    text = labels.get(REPLICAS_LABEL)
    if text is None:
        return 1
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value > 0 else None


def detect_pool_label(nodes: Iterable[Mapping[str, Any]]) -> str | None:
    """The first of ``POOL_LABELS`` that any node carries."""
    present: set[str] = set()
    for n in nodes:
        present.update((n.get("metadata") or {}).get("labels") or {})
    return next((label for label in POOL_LABELS if label in present), None)


def _ready(node: Mapping[str, Any]) -> bool:
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return bool(c.get("status") == "True")
    return False


def pod_requests(pod: Mapping[str, Any]) -> dict[str, Decimal]:
    """A pod's effective requests: the sum over its containers, at least the largest init
    container's, plus its overhead
    (https://kubernetes.io/docs/concepts/workloads/pods/init-containers/#resource-sharing-within-containers)."""
    spec = pod.get("spec") or {}
    total: dict[str, Decimal] = defaultdict(Decimal)
    for c in spec.get("containers") or []:
        for k, v in ((c.get("resources") or {}).get("requests") or {}).items():
            total[k] += parse_quantity(v)
    for c in spec.get("initContainers") or []:
        for k, v in ((c.get("resources") or {}).get("requests") or {}).items():
            total[k] = max(total[k], parse_quantity(v))
    for k, v in (spec.get("overhead") or {}).items():
        total[k] += parse_quantity(v)
    return dict(total)


def leased_devices(pod: Mapping[str, Any]) -> tuple[str, tuple[int, ...]] | None:
    """The node and device indices the lease of ``pod``'s completion index names, as its
    Job recorded them (``DEVICES_ANNOTATION``); None when it records none or is unreadable."""
    meta = pod.get("metadata") or {}
    text = (meta.get("annotations") or {}).get(DEVICES_ANNOTATION)
    idx = pod_index(pod)
    if not isinstance(text, str) or idx is None:
        return None
    try:
        rec = json.loads(text)
        node, rows = rec["node"], rec["devices"]
        devices = rows[idx] if isinstance(rows, list) and idx < len(rows) else None
    except (ValueError, KeyError, TypeError):
        return None
    if (
        not isinstance(node, str)
        or not isinstance(devices, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    ):
        return None
    return node, tuple(devices)


def node_devices(
    name: str,
    model: str,
    gpus: int,
    taken: int,
    leased: Collection[int],
    cpus: float,
    memory: int,
    slices: int = 1,
) -> NodeDevices:
    """One node's row of ``gpus`` devices: ``taken`` of them (other pods' GPUs) on the first
    indices that no lease of stowplan's names, then on leased ones if they do not fit (a
    node over-committed that way makes the core drop the lease it can no longer keep). A node
    that time-slices its GPUs (``slices`` replicas each) counts ``taken`` in replicas, filling
    one device's slices before the next.

    NOTE: ``NodeDevices`` reads 0 CPUs or memory as "not counted per node"; a full node
    keeps the least amount instead (1 millicore, 1 byte), which no run fits into."""
    order = [d for d in range(gpus) if d not in leased] + [d for d in range(gpus) if d in leased]
    left = max(0, min(taken, gpus * slices))
    held = dict.fromkeys(range(gpus), 0)
    for d in order:
        held[d] = min(slices, left)
        left -= held[d]
    one = MILLI // slices
    return NodeDevices(
        name=name,
        model=model if gpus else "",
        devices=tuple(MILLI if not held[d] else (slices - held[d]) * one for d in range(gpus)),
        cpus=max(0.001, cpus),
        memory=max(1, memory),
    )


class Discovery(Struct, frozen=True, kw_only=True):
    pools: list[Pool]
    pool_label: str | None
    notes: list[str] = field(default_factory=list)
    """nodes left out and why (shown by ``stowplan providers``)."""


def pools_of(
    provider: str,
    nodes: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    *,
    pool_label: str | None,
    gpu_resource: str = "nvidia.com/gpu",
    tolerations: Sequence[str] = (),
    site: str | None = None,
    autoscale: Mapping[str, KubernetesAutoscaleSpec] | None = None,
    own_jobs: Collection[str] = (),
) -> Discovery:
    """The node pools of ``nodes``, in pool-id order; ``pool_label`` None: detected.
    ``own_jobs``: the names of this provider's Jobs, whose pods the core's leases count
    (module doc: *Own pods*)."""
    autoscale = autoscale or {}
    label = pool_label or detect_pool_label(nodes)
    notes: list[str] = []
    if label is None:
        why = "no node carries a node-pool label (" + ", ".join(POOL_LABELS) + ")"
        if autoscale:
            why += "; set node_pool_label so that the autoscaled pools can be selected"
        return Discovery(pools=[], pool_label=None, notes=[why])
    tolerated = {gpu_resource, *tolerations}
    used: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    leased: dict[str, set[int]] = defaultdict(set)  # node (hostname) -> devices leased there
    for p in pods:
        if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        meta = p.get("metadata") or {}
        if (meta.get("labels") or {}).get(JOB_NAME_LABEL) in own_jobs and not meta.get(
            "deletionTimestamp"
        ):
            lease = leased_devices(p)  # bound or not yet: the core holds its devices
            if lease is not None:
                leased[lease[0]].update(lease[1])
            continue
        node = (p.get("spec") or {}).get("nodeName")
        if not node:
            continue
        for k, v in pod_requests(p).items():
            used[node][k] += v
    cpus: dict[str, Decimal] = defaultdict(Decimal)
    memory: dict[str, Decimal] = defaultdict(Decimal)
    gpus: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    shapes: dict[str, Shape] = {}
    regions: dict[str, set[str]] = defaultdict(set)
    taints: dict[str, set[str]] = defaultdict(set)
    present: dict[str, int] = defaultdict(int)
    rows: dict[str, list[NodeDevices]] = defaultdict(list)
    replicas: dict[str, set[int]] = defaultdict(set)  # pool -> its GPU nodes' replicas per GPU
    hostnames: set[str] = set()
    for n in sorted(nodes, key=lambda n: str((n.get("metadata") or {}).get("name"))):
        meta = n.get("metadata") or {}
        name = str(meta.get("name"))
        labels: dict[str, str] = meta.get("labels") or {}
        pool = labels.get(label)
        if pool is None:
            notes.append(f"node {name}: no {label} label; not in any pool")
            continue
        present[pool] += 1
        spec = n.get("spec") or {}
        if spec.get("unschedulable"):
            notes.append(f"node {name}: cordoned; left out")
            continue
        if not _ready(n):
            notes.append(f"node {name}: not Ready; left out")
            continue
        alloc = (n.get("status") or {}).get("allocatable") or {}
        n_alloc = int(parse_quantity(alloc.get(gpu_resource, "0")))
        product = labels.get(GPU_PRODUCT_LABEL)
        if product and n_alloc <= 0:
            notes.append(
                f"node {name}: labelled {product} but reports 0 allocatable {gpu_resource} "
                "(a broken GPU driver or device plugin); left out"
            )
            continue
        slices = replicas_of(labels)
        if slices is None or n_alloc % slices:
            notes.append(
                f"node {name}: {REPLICAS_LABEL}={labels.get(REPLICAS_LABEL)!r} does not divide "
                f"its {n_alloc} allocatable {gpu_resource} into whole GPUs; left out"
            )
            continue
        n_gpus = n_alloc // slices  # devices; the allocatable, used and free are in replicas
        taints[pool].update(
            str(t.get("key", ""))
            for t in spec.get("taints") or []
            if t.get("effect") in ("NoSchedule", "NoExecute") and t.get("key") not in tolerated
        )
        model = gpu_model_of(product) if product else "unknown"
        here = used.get(name, {})
        free_cpu = parse_quantity(alloc.get("cpu", "0")) - here.get("cpu", Decimal(0))
        free_mem = parse_quantity(alloc.get("memory", "0")) - here.get("memory", Decimal(0))
        taken = int(here.get(gpu_resource, Decimal(0)))
        cpus[pool] += max(Decimal(0), free_cpu)
        memory[pool] += max(Decimal(0), free_mem)
        if n_gpus:
            gpus[pool][model] += max(0, n_alloc - taken) // slices
            replicas[pool].add(slices)
        host = str(labels.get(HOSTNAME_LABEL) or name)
        if host in hostnames:
            notes.append(
                f"node {name}: another node has {HOSTNAME_LABEL}={host} too; its pool counts "
                "GPUs instead of leasing devices"
            )
            rows[pool].append(NodeDevices(name=""))  # a pin could not tell them apart
        else:
            hostnames.add(host)
            rows[pool].append(
                node_devices(
                    host,
                    model,
                    n_gpus,
                    taken,
                    leased.get(host, ()),
                    float(free_cpu),
                    int(free_mem),
                    slices,
                )
            )
        shape = Shape(
            cpus=float(parse_quantity(alloc.get("cpu", "0"))),
            memory=int(parse_quantity(alloc.get("memory", "0"))),
            gpus={model: n_gpus} if n_gpus else {},
        )
        prev = shapes.get(pool)
        if prev is None or (shape.cpus, shape.memory) > (prev.cpus, prev.memory):
            shapes[pool] = shape
        region = labels.get(REGION_LABEL)
        if region:
            regions[pool].add(region)
    cluster_regions = sorted({r for rs in regions.values() for r in rs})
    out = []
    for pool in sorted(set(shapes) | set(autoscale)):
        scale = autoscale.get(pool)
        region = min(regions[pool]) if regions[pool] else ""
        node, max_instances, boot_s = shapes.get(pool), 0, 0.0
        required = set(taints[pool])
        if scale is not None:
            node = Shape(
                cpus=float(scale.node.cpus),
                memory=int(scale.node.memory),
                gpus=dict(scale.node.gpus),
            )
            max_instances = max(0, scale.max_nodes - present[pool])
            boot_s = scale.boot_s
            required.update(k for k in scale.taints if k not in tolerated)
            region = scale.region or region or (cluster_regions[0] if cluster_regions else "")
            if present[pool] >= scale.max_nodes:
                notes.append(f"autoscaled pool {pool}: at its maximum of {scale.max_nodes} nodes")
        devices = None
        row = sorted(rows[pool], key=lambda r: r.name)
        slices = max(replicas[pool], default=1)
        pool_gpus = dict(sorted(gpus[pool].items()))
        if len(replicas[pool]) > 1:
            # a whole GPU is as many replicas as its node has: one pool, one number
            notes.append(
                f"pool {pool}: its nodes time-slice their GPUs into different numbers of "
                f"replicas ({', '.join(map(str, sorted(replicas[pool])))}); its GPUs are not "
                "offered (give each number its own node pool)"
            )
            pool_gpus, row = (
                {},
                [NodeDevices(name=r.name, cpus=r.cpus, memory=r.memory) for r in row],
            )
        if scale is None and any(r.devices for r in row) and all(r.name for r in row):
            # NOTE: an autoscaled pool's new nodes are not known by device: it counts
            devices = PoolDevices(
                nodes=tuple(row), sharing=slices > 1, slices=slices if slices > 1 else 0
            )
        if required:
            notes.append(
                f"pool {pool}: tainted {', '.join(sorted(required))}; offered only to tasks "
                "that list these keys in placement.tolerations"
            )
        out.append(
            Pool(
                id=f"{provider}/{pool}",
                provider=provider,
                kind="kubernetes",
                site=site or region or provider,
                region=region,
                cpus=float(cpus[pool]),
                memory=int(memory[pool]),
                gpus=pool_gpus,
                node=node,
                max_instances=max_instances,
                boot_s=boot_s,
                hardware_class=f"{HARDWARE_PREFIX}{label}={pool}",
                taints=tuple(sorted(required)),
                devices=devices,
            )
        )
    return Discovery(pools=out, pool_label=label, notes=notes)


def unschedulable_patience(
    job: Mapping[str, Any],
    *,
    unschedulable_after: float,
    autoscale: Mapping[str, KubernetesAutoscaleSpec] | None = None,
) -> float:
    """Seconds a pod of ``job`` may stay unschedulable before it is reported so: for a pod
    bound to an autoscaled pool (by its ``nodeSelector``), the pool's boot time more, since
    it waits for the node its own pending state asks the autoscaler for."""
    selector = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
        "nodeSelector"
    ) or {}
    boot = max(
        (autoscale[v].boot_s for v in selector.values() if autoscale and v in autoscale),
        default=0.0,
    )
    return unschedulable_after + boot
