"""An emulated Kubernetes API server and control plane for the Kubernetes driver's tests.

No kube-apiserver can be installed on the machines this project runs on, so the tests talk to
this emulator instead, over real HTTP with kubernetes-asyncio and a token kubeconfig. It
follows the upstream documentation (each rule cites its page): resourceVersions and uids,
Status errors (404 NotFound, 409 AlreadyExists/Conflict, 422 Invalid, 410 Expired), list with
label and field selectors and paging, watch with bookmarks and resume, garbage collection
through ownerReferences, node lifecycle taints, a scheduler, and the Job controller's Indexed
Job semantics. Tests drive what kubelets and the network would do through :class:`KubeCluster`.

Layout: ``apimachinery`` (pure helpers), ``store`` (objects, history, clock), ``admission``
(defaulting, validation), ``emulator`` (the API verbs), ``kubelet`` (pod status transitions),
``controllers`` (control plane loops), ``server`` (HTTP and the test-facing controls),
``validation`` (manifests checked with kubernetes-validate, strict).

Why not kmock (the PyPI Kubernetes API emulator): see ``server.py``'s module notes in the
report; in short, kmock 0.8 registers a pytest plugin that imports pytest-asyncio (which it does
not declare), so installing it breaks every pytest run here, and its emulator lacks or differs
on every point the driver depends on (Status reasons, resourceVersions, resumable watches, 410,
selectors, propagation).
"""

from .kubelet import DISRUPTION_REASONS, WAITING_REASONS, PodOutcome
from .server import KubeCluster, NodeSpec, RequestRecord
from .validation import KUBERNETES_VERSIONS, validate_manifest

__all__ = [
    "DISRUPTION_REASONS",
    "KUBERNETES_VERSIONS",
    "WAITING_REASONS",
    "KubeCluster",
    "NodeSpec",
    "PodOutcome",
    "RequestRecord",
    "validate_manifest",
]
