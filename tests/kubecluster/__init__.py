"""The Kubernetes API server of the Kubernetes driver's tests: kmock's HTTP server, with what
kmock lacks emulated here after the upstream documentation.

No kube-apiserver can be installed on the machines this project runs on. The tests talk, over
real HTTP with kubernetes-asyncio and a token kubeconfig, to **kmock** (PyPI ``kmock`` 0.8,
https://github.com/nolar/kmock): ``KubeCluster.start()`` runs a ``kmock.Server`` (kmock's aiohttp
server) on 127.0.0.1 serving a ``kmock.RawHandler``, and every request reaches this package's
verbs through one kmock reaction (``handler << callback``, kmock's callable payloads). kmock
parses each request, keeps its own request history, and renders the answers: JSON bodies,
statuses and headers (409, 410, 422, 429/503 with ``Retry-After``), and watches and followed
logs as chunked streams that stay open (kmock's async-iterable payloads).

What is ours, and why: kmock's own ``KubernetesEmulator`` keeps objects and streams watch
events, but it lacks or differs on what the driver depends on, so its object state is not
used: no resourceVersions or uids, a plain conflict error instead of Status reasons
(AlreadyExists, Conflict, Invalid), no resumable watches (it ignores ``resourceVersion`` and
never answers 410 Expired), no bookmarks, no label or field selectors, no paging, no
propagation policies or garbage collection through ownerReferences, and no control plane.
This package supplies those, following the upstream documentation (each rule cites its
page): resourceVersions and uids, Status errors (404 NotFound, 409 AlreadyExists/Conflict,
422 Invalid, 410 Expired), list with label and field selectors and paging, watch with
bookmarks and resume, garbage collection through ownerReferences, node lifecycle taints, a
scheduler, and the Job controller's Indexed Job semantics. Tests drive what kubelets and the
network would do through :class:`KubeCluster`. kmock's discovery answers (``/api``,
``/apis``) are not used either: they list only resources declared to kmock and report
Kubernetes 1.26, while ours list exactly the emulated resources.

kmock 0.8 also registers a pytest plugin (entry point ``kmock``) that imports pytest-asyncio,
which kmock does not declare; pyproject.toml turns it off (``-p no:kmock``), as these tests
start kmock themselves and use no kmock fixture.

Layout: ``apimachinery`` (pure helpers), ``store`` (objects, history, clock), ``admission``
(defaulting, validation), ``emulator`` (the API verbs), ``kubelet`` (pod status transitions),
``controllers`` (control plane loops), ``server`` (kmock's server, the verb dispatch behind it,
and the test-facing controls), ``validation`` (manifests checked with kubernetes-validate,
strict).
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
