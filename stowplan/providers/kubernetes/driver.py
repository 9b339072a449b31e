"""The Kubernetes driver: sweeps as Indexed Jobs, watched natively.

What lives where: the rendering is ``render.py`` (pure), the pools ``discover.py`` (pure), the
state map ``states.py`` (pure), the API edge ``api.py``. This module does the I/O.

Idempotency: a request's Job and ConfigMap are named ``request_name(keys)`` and annotated with
their keys. ``submit`` creates the ConfigMap, then the Job, then makes the ConfigMap owned by
the Job. ``409 AlreadyExists`` is "already submitted" only when the object found has the same
keys; a create whose answer was lost is looked up by name once (found: submitted; not found:
a retryable error, and the shell submits again). Nothing is ever created twice: names decide.

Observation: ``describe`` is one list of the Jobs and one of their pods (label-selected).
``watch`` answers first with one batched ``describe`` (a failed one is counted in
``WatchSet.failures`` and tried again), while it lists, then watches Jobs and Pods of this
provider (label-selected) from the list's resourceVersion with bookmarks; ``410 Gone`` relists
and resumes. The last state of a deleted
pod is kept, so an evicted pod's reason is still known after it is gone.

Keys this instance has not seen (after a control-plane restart) are found in the
``stowplan.io/keys`` annotations of this provider's Jobs: one list call.

Outputs and logs (with ``bucket``): ``submit`` presigns, for each index, PUT URLs of its
declared outputs, logs and exit record (``render.slots_of``: the AWS driver's S3 layout) and
creates the ConfigMap with them; the pod's wrapper uploads. A succeeded attempt's report maps
each declared output to ``s3://BUCKET/PREFIX/attempts/RUN/KEY/outputs/PATH`` (a directory
``d/``: ``.../outputs/d.tar.gz``). The credentials that sign are the SDK's (default chain,
``AWS_PROFILE``; endpoint ``bucket_endpoint`` or ``AWS_ENDPOINT_URL``): they stay in this
process; the ConfigMap holds only URLs, each good for one PUT of one object until its lease
ends. After a restart, the object keys of a Job's attempts are read back from its ConfigMap.
`logs` reads the uploaded logs when the pod is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from stowplan.errors import ProviderError, SpecError
from stowplan.placement.problem import Pool
from stowplan.providers.base import (
    TERMINAL_PROVIDER_STATES,
    Capabilities,
    Capability,
    Facts,
    LaunchSpec,
    LogStream,
    Provider,
    ProviderRequest,
    ProviderState,
    Report,
    WatchSet,
)
from stowplan.providers.kubernetes.api import Api, KubernetesError
from stowplan.providers.kubernetes.discover import (
    POOL_LABELS,
    pools_of,
    unschedulable_patience,
)
from stowplan.providers.kubernetes.render import (
    COMPLETION_INDEX,
    CONTAINER,
    JOB_NAME_LABEL,
    KEYS_ANNOTATION,
    LEASE_MAX_S,
    MANAGED_BY,
    MANAGER,
    PROVIDER_LABEL,
    REQUEST_LABEL,
    KubernetesRequest,
    label_value,
    plan_jobs,
    slots_of,
)
from stowplan.providers.kubernetes.states import (
    exit_record,
    index_state,
    latest_pod,
    parse_indexes,
    pod_index,
    waiting_since,
)
from stowplan.spec.models import FailureClass, KubernetesProviderConfig

WATCH_TIMEOUT_S = 300
"""each watch request asks the server to end it after this long; it is then resumed."""
WATCH_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""between attempts to re-establish a failed watch (no answer, 5xx): the watch is a
long-running observation, not a verb the shell retries."""
LOG_POLL_S = 1.0
SELECTOR_MAX_NAMES = 50
"""describe lists Jobs by name up to this many; beyond, every Job of this provider."""
CONFIG_FILE = "stowplan.toml"


def _keys_of(obj: Mapping[str, Any]) -> tuple[str, ...]:
    ann = (obj.get("metadata") or {}).get("annotations") or {}
    try:
        keys = json.loads(ann.get(KEYS_ANNOTATION) or "[]")
    except ValueError:
        return ()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return ()
    return tuple(keys)


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


class KubernetesProvider(Provider):
    poll_max = 5.0

    def __init__(
        self,
        name: str,
        config: KubernetesProviderConfig,
        *,
        state_dir: Path,
        api_client: Any = None,
    ) -> None:
        self.name = name
        self.config = config
        self.namespace = config.namespace or "default"
        self.capabilities = Capabilities(
            has=frozenset(
                {
                    Capability.RUNS,
                    Capability.GPUS,
                    Capability.ARRAYS,
                    Capability.LOGS,
                    Capability.CONTAINERS,
                    Capability.SECRETS,
                    Capability.NATIVE_WATCH,
                }
                | ({Capability.OUTPUTS} if config.bucket is not None else set())
                | ({Capability.ELASTIC} if config.autoscale else set())
            ),
            why_not={
                **(
                    {}
                    if config.autoscale
                    else {
                        Capability.ELASTIC: "no autoscaled node pools: describe them under "
                        f"[providers.{name}.autoscale.POOL] to have them offered as elastic "
                        "capacity"
                    }
                ),
                Capability.CANCEL_MEMBER: "an Indexed Job cannot stop one index that has not "
                "started; an attempt is cancelled when every attempt of its Job is (the others "
                "run to the end and their reports are ignored); an index reported NO_CAPACITY is "
                "the exception: its waiting pod is deleted at once and Kubernetes fails the index",
                **(
                    {}
                    if config.bucket is not None
                    else {
                        Capability.OUTPUTS: "no bucket: set bucket = 's3://BUCKET/PREFIX' in "
                        f"[providers.{name}]"
                    }
                ),
            },
            notes=(
                (
                    f"outputs, logs and exit records are uploaded to {config.bucket} through "
                    "presigned URLs made at submit (pods need no credentials; the URLs last "
                    "for the Job's deadline plus an hour, 7 days without a timeout, and never "
                    "beyond the signing credentials' own expiry); an output that cannot be "
                    "uploaded fails the attempt as an infrastructure failure"
                    if config.bucket is not None
                    else "outputs are not returned: they stay in the pod's emptyDir at "
                    "/stowplan/work/<run>/<attempt> and are lost with the pod (the wrapper "
                    "checks that declared outputs exist); set bucket = 's3://BUCKET/PREFIX' "
                    "to have them uploaded"
                ),
                "Kubernetes merges a container's stdout and stderr: logs of either stream "
                "(and `stowplan logs --stderr`) return the container's one log",
                "a Job deleted by ttl_after_finished is forgotten: its attempts become UNKNOWN "
                "unless this process saw them end",
                "secrets are Kubernetes Secrets in the Job's namespace: secret:NAME#KEY becomes "
                "a secretKeyRef (KEY defaults to the variable's name)",
                "the image must contain python3 (3.6 or later): it runs stowplan's wrapper",
                "elastic pools are the node pools of [providers.NAME.autoscale]: provision and "
                "terminate start and stop nothing; the cluster's autoscaler adds nodes when "
                "stowplan's pods wait for them and removes idle nodes by its own rules",
            ),
        )
        self._api: Api | None = None
        self._given_client = api_client
        self._connect_lock = asyncio.Lock()
        self._index: dict[str, tuple[str, int]] = {}
        """key -> (Job name, completion index)."""
        self._job_keys: dict[str, tuple[str, ...]] = {}
        self._cancelled: set[str] = set()
        self._deleted: set[str] = set()
        """Jobs this instance deleted (their unfinished keys are CANCELLED)."""
        self._finished: dict[str, Report] = {}
        self._gone_pods: dict[tuple[str, int], dict[str, Any]] = {}
        self._slots: dict[str, dict[str, str]] = {}
        """key -> URL slot -> S3 object key (with a bucket)."""
        self._outputs: dict[str, dict[str, str]] = {}
        """key -> declared output -> S3 object key (with a bucket)."""
        self._read_back: set[str] = set()
        """Jobs whose ConfigMap was read for the object keys of their attempts."""
        self._s3_stack = contextlib.AsyncExitStack()
        self._s3_client: Any = None
        self._s3_lock = asyncio.Lock()
        self.pool_label: str | None = None
        self.discovery_notes: list[str] = []

    # -- connection ---------------------------------------------------------------------------

    def _kubeconfig_path(self) -> str | None:
        if self.config.kubeconfig is not None:
            return os.path.expanduser(self.config.kubeconfig)
        env = os.environ.get("KUBECONFIG")
        if env:
            return env
        default = os.path.expanduser("~/.kube/config")
        return default if os.path.exists(default) else None

    async def _connect(self) -> Api:
        if self._api is not None:
            return self._api
        async with self._connect_lock:
            if self._api is None:
                client = self._given_client or await self._new_client()
                self._api = Api(self.name, client, self.config.request_timeout)
        return self._api

    async def _new_client(self) -> Any:
        from kubernetes_asyncio import client
        from kubernetes_asyncio import config as kconfig

        cfg = client.Configuration()
        path = self._kubeconfig_path()
        field = f"$.providers.{self.name}"
        if path is None:
            try:
                kconfig.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            except kconfig.ConfigException:
                raise SpecError(
                    "no kubeconfig found ($KUBECONFIG, ~/.kube/config) and not running in a "
                    "cluster",
                    file=CONFIG_FILE,
                    path=f"{field}.kubeconfig",
                    hint="set kubeconfig = 'path/to/kubeconfig' or run inside the cluster",
                ) from None
            return client.ApiClient(cfg)
        paths = [p for p in path.split(os.pathsep) if p]
        if not any(os.path.exists(p) for p in paths):
            raise SpecError(
                f"kubeconfig {path!r} does not exist",
                file=CONFIG_FILE,
                path=f"{field}.kubeconfig",
                hint="give the path of an existing kubeconfig, or leave kubeconfig out",
            )
        try:
            contexts, _active = kconfig.list_kube_config_contexts(path)
        except (kconfig.ConfigException, OSError, ValueError) as e:
            raise SpecError(
                f"kubeconfig {path!r} cannot be read: {type(e).__name__}",
                file=CONFIG_FILE,
                path=f"{field}.kubeconfig",
                hint="check the file with `kubectl config view`",
            ) from None
        names = sorted(str(c.get("name")) for c in contexts or [])
        if self.config.context is not None and self.config.context not in names:
            raise SpecError(
                f"context {self.config.context!r} is not in the kubeconfig {path!r}",
                file=CONFIG_FILE,
                path=f"{field}.context",
                hint="use one of: " + (", ".join(names) or "(the kubeconfig has no contexts)"),
            )
        try:
            await kconfig.load_kube_config(
                config_file=path,
                context=self.config.context,
                client_configuration=cfg,
                persist_config=False,
            )
        except kconfig.ConfigException as e:
            # NOTE: the loader's messages name fields, never credential values
            raise SpecError(
                f"kubeconfig {path!r}: {str(e)[:200]}",
                file=CONFIG_FILE,
                path=f"{field}.context",
                hint="check the context with `kubectl config get-contexts`",
            ) from None
        return client.ApiClient(cfg)

    # -- the bucket --------------------------------------------------------------------------

    async def _s3(self) -> Any:
        async with self._s3_lock:
            if self._s3_client is None:
                from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
                from aiobotocore.session import AioSession  # type: ignore[import-untyped]

                session = AioSession()
                region = self.config.bucket_region or session.get_config_variable("region")
                extra: dict[str, Any] = {"signature_version": "s3v4"}
                if self.config.bucket_endpoint is not None:
                    extra["s3"] = {"addressing_style": "path"}
                self._s3_client = await self._s3_stack.enter_async_context(
                    session.create_client(
                        "s3",
                        region_name=region or "us-east-1",
                        endpoint_url=self.config.bucket_endpoint,
                        config=AioConfig(
                            retries={"total_max_attempts": 1, "mode": "standard"},
                            connect_timeout=10,
                            read_timeout=self.config.request_timeout,
                            **extra,
                        ),
                    )
                )
            return self._s3_client

    async def _presign(self, req: KubernetesRequest) -> dict[str, dict[str, str]]:
        """key -> slot -> a presigned PUT URL of its object, valid for ``req.lease_s``."""
        from botocore.exceptions import BotoCoreError  # type: ignore[import-untyped]

        s3 = await self._s3()
        out: dict[str, dict[str, str]] = {}
        try:
            for key, slots in req.slots.items():
                out[key] = {
                    slot: await s3.generate_presigned_url(
                        "put_object",
                        Params={"Bucket": req.bucket, "Key": obj},
                        ExpiresIn=min(req.lease_s, LEASE_MAX_S),
                    )
                    for slot, obj in slots.items()
                }
        except BotoCoreError as e:
            # NOTE: botocore's messages name what is missing, never a credential's value
            raise ProviderError(
                f"cannot presign uploads to s3://{req.bucket}: {type(e).__name__}: {e} (give "
                "the control plane AWS credentials: AWS_PROFILE, the AWS_* variables or an "
                "instance role)",
                provider=self.name,
                retryable=False,
            ) from None
        return out

    async def _get_object(self, obj: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = await self._s3()
        try:
            got = await s3.get_object(Bucket=self.config.bucket_name, Key=obj)
            async with got["Body"] as body:
                data: bytes = await body.read()
        except ClientError as e:
            if (e.response.get("Error") or {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise ProviderError(
                f"read s3://{self.config.bucket_name}/{obj}: {e}",
                provider=self.name,
                retryable=True,
            ) from None
        except (BotoCoreError, OSError) as e:
            raise ProviderError(
                f"read s3://{self.config.bucket_name}/{obj}: {type(e).__name__}",
                provider=self.name,
                retryable=True,
            ) from None
        return data

    async def _read_back_uploads(self, api: Api, names: Sequence[str]) -> None:
        """The object keys of the attempts of Jobs this instance did not submit (after a
        restart), from their ConfigMaps' entries; one read per Job, once."""
        if self.config.bucket is None:
            return
        for name in names:
            if name in self._read_back:
                continue
            cm = await api.call(
                f"read ConfigMap {name}",
                api.core.read_namespaced_config_map,
                name,
                self.namespace,
                ok404=True,
            )
            self._read_back.add(name)
            for text in ((cm or {}).get("data") or {}).values():
                self._learn_entry(text)

    def _learn_entry(self, text: str) -> None:
        try:
            entry = json.loads(text)
            key, run_id, outputs = entry["key"], entry["run_id"], entry["outputs"]
        except (ValueError, KeyError, TypeError):
            return
        if not (isinstance(key, str) and isinstance(run_id, str) and "urls" in entry):
            return
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            return
        slots = slots_of(self.config, run_id, key, outputs)
        self._slots[key] = slots
        self._outputs[key] = {o: slots[f"output_{i}"] for i, o in enumerate(outputs)}

    @property
    def _selector(self) -> str:
        return f"{MANAGED_BY}={MANAGER},{PROVIDER_LABEL}={label_value(self.name)}"

    # -- discover / plan ----------------------------------------------------------------------

    async def discover(self) -> list[Pool]:
        api = await self._connect()
        nodes = (await api.call("list nodes", api.core.list_node)).get("items") or []
        live = "status.phase!=Succeeded,status.phase!=Failed"
        notes: list[str] = []
        try:
            pods_body = await api.call(
                "list pods", api.core.list_pod_for_all_namespaces, field_selector=live
            )
        except KubernetesError as e:
            if e.status != 403:
                raise
            # NOTE: namespace-scoped RBAC: only this namespace's pods are subtracted
            notes.append(
                f"no permission to list pods in every namespace: free capacity counts only "
                f"the pods of namespace {self.namespace}"
            )
            pods_body = await api.call(
                "list pods", api.core.list_namespaced_pod, self.namespace, field_selector=live
            )
        pods = pods_body.get("items") or []
        label = self.config.node_pool_label
        if label is not None and not any(
            label in ((n.get("metadata") or {}).get("labels") or {}) for n in nodes
        ):
            carried = sorted(
                {
                    k
                    for n in nodes
                    for k in ((n.get("metadata") or {}).get("labels") or {})
                    if k in POOL_LABELS
                }
            )
            raise SpecError(
                f"node_pool_label {label!r} is on none of the cluster's {len(nodes)} nodes",
                file=CONFIG_FILE,
                path=f"$.providers.{self.name}.node_pool_label",
                hint=(
                    "use one the nodes carry: " + ", ".join(carried)
                    if carried
                    else "leave it out to detect it, or label the nodes"
                ),
            )
        found = pools_of(
            self.name,
            nodes,
            pods,
            pool_label=label,
            gpu_resource=self.config.gpu_resource,
            tolerations=self.config.tolerations,
            site=self.config.site,
            autoscale=self.config.autoscale,
            own_jobs=self._own_jobs(pods),
        )
        self.pool_label = found.pool_label
        self.discovery_notes = notes + list(found.notes)
        return found.pools

    def _own_jobs(self, pods: Sequence[Mapping[str, Any]]) -> set[str]:
        """The Jobs of this provider among ``pods``' and those it knows: their pods hold what
        the core leases (``discover.pools_of``). Read from the pods' labels too, so that a
        restarted control plane, which restores its leases, finds them before it has looked
        its keys up."""
        provider = label_value(self.name)
        out = set(self._job_keys)
        for p in pods:
            meta = p.get("metadata") or {}
            labels = meta.get("labels") or {}
            if (
                meta.get("namespace") == self.namespace
                and labels.get(MANAGED_BY) == MANAGER
                and labels.get(PROVIDER_LABEL) == provider
                and labels.get(JOB_NAME_LABEL)
            ):
                out.add(str(labels[JOB_NAME_LABEL]))
        return out

    def plan(self, launches: Sequence[LaunchSpec], facts: Facts) -> list[ProviderRequest]:
        return list(
            plan_jobs(
                launches,
                facts.pools,
                self.config,
                provider=self.name,
                namespace=self.namespace,
            )
        )

    # -- submit -------------------------------------------------------------------------------

    async def submit(self, requests: Sequence[ProviderRequest]) -> list[Report]:
        api = await self._connect()
        out: list[Report] = []
        for req in requests:
            if not isinstance(req, KubernetesRequest):
                raise ProviderError(
                    f"not a Kubernetes request: {type(req).__name__}",
                    provider=self.name,
                    retryable=False,
                )
            self._remember(req.name, req.keys)
            self._slots.update(req.slots)
            self._outputs.update(req.outputs)
            self._read_back.add(req.name)
            out.extend(await self._submit_one(api, req))
        return out

    def _remember(self, job: str, keys: Sequence[str]) -> None:
        self._job_keys[job] = tuple(keys)
        for i, k in enumerate(keys):
            self._index[k] = (job, i)

    def _rejected(self, req: KubernetesRequest, message: str) -> list[Report]:
        return [
            Report(
                key=k,
                state=ProviderState.FAILED,
                failure=FailureClass.PROVIDER_REJECTED,
                message=message,
            )
            for k in req.keys
        ]

    async def _create(
        self, api: Api, req: KubernetesRequest, kind: str, create: Any, read: Any, body: Any
    ) -> tuple[dict[str, Any] | None, str]:
        """Create ``body``; (object, "") when it exists now with our keys, (None, why) when a
        different object holds the name or the API refused it."""
        what = f"create {kind} {req.namespace}/{req.name}"
        try:
            return await api.call(what, create, req.namespace, body), ""
        except KubernetesError as e:
            if e.status == 409 and e.reason == "AlreadyExists":
                pass
            elif e.status == 0:
                # the answer was lost: the create may have happened. Look once, by name.
                found = await api.call(
                    f"read {kind} {req.name}", read, req.name, req.namespace, ok404=True
                )
                if found is None:
                    raise
                if set(_keys_of(found)) == set(req.keys):
                    return found, ""
                raise
            elif e.retryable:
                raise
            else:
                return None, str(e)
        found = await api.call(f"read {kind} {req.name}", read, req.name, req.namespace, ok404=True)
        if found is None:
            raise KubernetesError(
                f"{what}: AlreadyExists, then not found (deleted meanwhile); submit again",
                provider=self.name,
                retryable=True,
            )
        if set(_keys_of(found)) != set(req.keys):
            return None, (
                f"a {kind} named {req.name} exists in namespace {req.namespace} but is not "
                "stowplan's request for these attempts (its stowplan.io/keys differ); delete "
                "it or use another namespace"
            )
        return found, ""

    async def _submit_one(self, api: Api, req: KubernetesRequest) -> list[Report]:
        body = req.with_urls(await self._presign(req)) if req.slots else req.config_map
        cm, why = await self._create(
            api,
            req,
            "ConfigMap",
            api.core.create_namespaced_config_map,
            api.core.read_namespaced_config_map,
            body,
        )
        if cm is None:
            return self._rejected(req, why)
        job, why = await self._create(
            api,
            req,
            "Job",
            api.batch.create_namespaced_job,
            api.batch.read_namespaced_job,
            req.job,
        )
        if job is None:
            return self._rejected(req, why)
        uid = (job.get("metadata") or {}).get("uid")
        if uid and not (cm.get("metadata") or {}).get("ownerReferences"):
            owner = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": req.name,
                "uid": uid,
                "blockOwnerDeletion": False,
            }
            with contextlib.suppress(KubernetesError):
                # NOTE: best effort: cancel deletes the ConfigMap itself too
                await api.call(
                    f"own ConfigMap {req.name}",
                    api.core.patch_namespaced_config_map,
                    req.name,
                    req.namespace,
                    [{"op": "add", "path": "/metadata/ownerReferences", "value": [owner]}],
                )
        created = int((job.get("metadata") or {}).get("generation") or 1) == 1 and not (
            job.get("status") or {}
        )
        reports = []
        for i, k in enumerate(req.keys):
            st = index_state(job, i, [], now=time.time(), unschedulable_after=self._patience(job))
            state = st.state if st.state is not ProviderState.UNKNOWN else ProviderState.QUEUED
            reports.append(
                Report(
                    key=k,
                    state=state,
                    failure=st.failure,
                    job_id=f"{req.namespace}/{req.name}#{i}",
                    message=(
                        f"submitted as Indexed Job {req.namespace}/{req.name} index {i}"
                        if created
                        else f"already submitted as {req.namespace}/{req.name} index {i}: "
                        + st.message
                    ),
                )
            )
        return reports

    @property
    def _unschedulable_after(self) -> float:
        v = self.config.unschedulable_after
        return float(v) if isinstance(v, int | float) else 600.0

    def _patience(self, job: Mapping[str, Any]) -> float:
        return unschedulable_patience(
            job, unschedulable_after=self._unschedulable_after, autoscale=self.config.autoscale
        )

    # -- elastic ------------------------------------------------------------------------------

    async def provision(self, pool: str, count: int, token: str) -> list[str]:
        name = pool.split("/", 1)[1] if pool.startswith(f"{self.name}/") else None
        if name not in self.config.autoscale or count < 1:
            raise ProviderError(
                f"cannot provision {count} node(s) of {pool!r}: not an autoscaled node pool "
                f"of this provider (add it under [providers.{self.name}.autoscale])",
                provider=self.name,
                retryable=False,
            )
        # NOTE: nothing to start: the cluster's autoscaler adds nodes for the pods that wait
        # for them. The ids only let the core count what it asked for.
        return [f"{name}/{token}/{i}" for i in range(count)]

    async def terminate(self, pool: str, count: int, token: str) -> None:
        # NOTE: the cluster's autoscaler removes idle nodes by its own rules
        del pool, count, token

    # -- describe -----------------------------------------------------------------------------

    async def _lookup(self, api: Api, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Every Job of this provider (one list); learns the keys they carry."""
        body = await api.call(
            "list Jobs",
            api.batch.list_namespaced_job,
            self.namespace,
            label_selector=self._selector,
        )
        jobs = {_name(j): j for j in body.get("items") or []}
        for name, j in jobs.items():
            keys_of = _keys_of(j)
            if keys_of:
                self._remember(name, keys_of)
        return jobs

    async def describe(self, keys: Sequence[str]) -> list[Report]:
        api = await self._connect()
        live = [k for k in keys if k not in self._finished]
        jobs: dict[str, dict[str, Any]] | None = None
        if any(k not in self._index for k in live):
            jobs = await self._lookup(api, live)
        names = sorted({self._index[k][0] for k in live if k in self._index})
        pods: list[dict[str, Any]] = []
        if names:
            if jobs is None:
                selector = self._selector
                if len(names) <= SELECTOR_MAX_NAMES:
                    selector += f",{REQUEST_LABEL} in ({','.join(names)})"
                body = await api.call(
                    "list Jobs",
                    api.batch.list_namespaced_job,
                    self.namespace,
                    label_selector=selector,
                )
                jobs = {_name(j): j for j in body.get("items") or []}
            selector = self._selector
            if len(names) <= SELECTOR_MAX_NAMES:
                selector += f",{REQUEST_LABEL} in ({','.join(names)})"
            body = await api.call(
                "list pods",
                api.core.list_namespaced_pod,
                self.namespace,
                label_selector=selector,
            )
            pods = body.get("items") or []
            await self._read_back_uploads(api, names)
        return self._reports(keys, jobs or {}, pods)

    def _output_urls(self, key: str) -> dict[str, str]:
        bucket = self.config.bucket_name
        return {o: f"s3://{bucket}/{obj}" for o, obj in self._outputs.get(key, {}).items()}

    def _reports(
        self,
        keys: Sequence[str],
        jobs: Mapping[str, Mapping[str, Any]],
        pods: Sequence[Mapping[str, Any]],
    ) -> list[Report]:
        seen: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
        for p in pods:
            owner = ((p.get("metadata") or {}).get("labels") or {}).get(JOB_NAME_LABEL)
            p_idx = pod_index(p)
            if owner and p_idx is not None:
                seen[(str(owner), p_idx)].append(p)
        return self._reports_of(keys, jobs, seen)

    def _reports_of(
        self,
        keys: Sequence[str],
        jobs: Mapping[str, Mapping[str, Any]],
        seen: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]],
    ) -> list[Report]:
        """The reports of ``keys`` from the pods listed or watched now of each (Job, index)
        and the last state of deleted ones (``_gone_pods``)."""
        now = time.time()
        out = []
        for key in keys:
            cached = self._finished.get(key)
            if cached is not None:
                out.append(cached)
                continue
            where = self._index.get(key)
            if where is None:
                out.append(
                    Report(key=key, state=ProviderState.UNKNOWN, message="no Job has this key")
                )
                continue
            name, idx = where
            job = jobs.get(name)
            job_id = f"{self.namespace}/{name}#{idx}"
            if job is not None and (job.get("metadata") or {}).get("deletionTimestamp"):
                job = None if name in self._deleted else job
            if job is None:
                if name in self._deleted:
                    report = Report(
                        key=key,
                        state=ProviderState.CANCELLED,
                        job_id=job_id,
                        message=f"Job {name} deleted by cancel",
                    )
                    self._finished[key] = report
                else:
                    report = Report(
                        key=key,
                        state=ProviderState.UNKNOWN,
                        job_id=job_id,
                        message=f"Job {self.namespace}/{name} not found",
                    )
                out.append(report)
                continue
            live = seen.get((name, idx), [])
            gone = self._gone_pods.get((name, idx))
            st = index_state(
                job,
                idx,
                live,
                gone=[gone] if gone is not None else [],
                now=now,
                unschedulable_after=self._patience(job),
            )
            failure, message = st.failure, st.message
            if failure is FailureClass.USER_ERROR:
                pod = latest_pod([*live, *([gone] if gone is not None else [])])
                record = (exit_record(pod) if pod is not None else None) or {}
                if record.get("reason") == "setup":
                    # the wrapper could not upload an output: not the command's fault
                    failure = FailureClass.NODE_FAILURE
                    message = f"uploading outputs to s3://{self.config.bucket_name} failed"
            report = Report(
                key=key,
                state=st.state,
                failure=failure,
                job_id=job_id,
                node=st.node,
                exit_code=st.exit_code,
                message=message + (f" (pod {st.pod})" if st.pod else ""),
                started_at=st.started_at,
                ended_at=st.ended_at,
                outputs=self._output_urls(key) if st.state is ProviderState.SUCCEEDED else {},
            )
            if report.state in TERMINAL_PROVIDER_STATES:
                self._finished[key] = report
            out.append(report)
        return out

    # -- watch --------------------------------------------------------------------------------

    async def watch(
        self, keys: WatchSet, *, renew_every: float = 60.0
    ) -> AsyncIterator[list[Report]]:
        api = await self._connect()
        jobs: dict[str, dict[str, Any]] = {}
        pods: dict[str, dict[str, Any]] = {}
        at: dict[tuple[str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
        """(Job, index) -> pod name -> live pod: kept up to date by the events, so that a
        change costs the reports of what it touched, not of every index of its Job."""
        pod_at: dict[str, tuple[str, int]] = {}
        dirty: set[str] = set()
        """Jobs whose every index is to be said again (a Job condition changed, a relist)."""
        dirty_at: set[tuple[str, int]] = set()
        unschedulable: dict[tuple[str, int], float] = {}
        """(Job, index) -> since when its pod waits for a node: it becomes NO_CAPACITY by the
        clock alone, with no event to say so."""
        changed = asyncio.Event()
        listed: set[str] = set()
        said: set[str] = set()

        def job_diff(prev: Mapping[str, Any], obj: Mapping[str, Any]) -> bool:
            """Mark what changed between two states of a Job; True: all of it."""
            pst, nst = prev.get("status") or {}, obj.get("status") or {}
            if (
                pst.get("conditions") != nst.get("conditions")
                or (prev.get("spec") or {}).get("suspend") != (obj.get("spec") or {}).get("suspend")
                or (prev.get("metadata") or {}).get("deletionTimestamp")
                != (obj.get("metadata") or {}).get("deletionTimestamp")
            ):
                return True
            name = _name(obj)
            for field in ("completedIndexes", "failedIndexes"):
                before, after = pst.get(field), nst.get(field)
                if before != after:
                    dirty_at.update((name, i) for i in parse_indexes(before) ^ parse_indexes(after))
            return False

        def on_job(kind: str, obj: dict[str, Any]) -> None:
            name = _name(obj)
            prev = jobs.get(name)
            if kind == "DELETED":
                jobs.pop(name, None)
                dirty.add(name)
            else:
                jobs[name] = obj
                keys_of = _keys_of(obj)
                if keys_of and name not in self._job_keys:
                    self._remember(name, keys_of)
                    dirty.add(name)
                elif prev is None or job_diff(prev, obj):
                    dirty.add(name)
            changed.set()

        def on_pod(kind: str, obj: dict[str, Any]) -> None:
            name = _name(obj)
            job = ((obj.get("metadata") or {}).get("labels") or {}).get(JOB_NAME_LABEL)
            idx = pod_index(obj)
            where = (str(job), idx) if job and idx is not None else None
            old = pod_at.pop(name, None)
            if old is not None:
                at[old].pop(name, None)
                if not at[old]:
                    del at[old]
            if kind == "DELETED":
                pods.pop(name, None)
                if where is not None:
                    self._gone_pods[where] = obj
            else:
                pods[name] = obj
                if where is not None:
                    at[where][name] = obj
                    pod_at[name] = where
            if where is not None:
                dirty_at.add(where)
                since = waiting_since(obj) if kind != "DELETED" else None
                if since is None:
                    unschedulable.pop(where, None)
                else:
                    unschedulable[where] = since
            elif job:
                dirty.add(str(job))
            changed.set()

        def on_relist(kind: str, items: list[dict[str, Any]]) -> None:
            listed.add(kind)
            if kind == "pods":
                # pods deleted while the watch was away: keep their last known state
                now_listed = {_name(o) for o in items}
                for name in set(pods) - now_listed:
                    on_pod("DELETED", pods[name])
                pods.clear()
                at.clear()
                pod_at.clear()
                unschedulable.clear()
            else:
                jobs.clear()
            for obj in items:
                (on_job if kind == "jobs" else on_pod)("ADDED", obj)
            dirty.update(self._job_keys)

        def due() -> float | None:
            """The wall-clock time the first waiting pod becomes NO_CAPACITY; marks those
            already due as changed."""
            first = None
            wall = time.time()
            for where, since in list(unschedulable.items()):
                job = jobs.get(where[0])
                if job is None:
                    continue
                at_time = since + self._patience(job)
                if at_time <= wall:
                    dirty_at.add(where)
                    del unschedulable[where]
                elif first is None or at_time < first:
                    first = at_time
            return first

        tasks = [
            asyncio.ensure_future(
                self._follow(
                    api,
                    "Jobs",
                    api.batch.list_namespaced_job,
                    (self.namespace,),
                    on_job,
                    lambda items: on_relist("jobs", items),
                    keys,
                )
            ),
            asyncio.ensure_future(
                self._follow(
                    api,
                    "pods",
                    api.core.list_namespaced_pod,
                    (self.namespace,),
                    on_pod,
                    lambda items: on_relist("pods", items),
                    keys,
                )
            ),
        ]
        loop = asyncio.get_running_loop()
        last_renew = loop.time()
        try:
            # the first answer is one batched describe while the streams list: it is also the
            # fallback's shape (a failed one is counted and tried again; a bug escapes)
            delay = self.poll_min
            while True:
                first = keys.keys()
                try:
                    reports = await self.describe(first) if first else []
                    break
                except (ProviderError, OSError):
                    keys.failures += 1
                    await asyncio.sleep(delay)
                    delay = min(self.poll_max, delay * 2)
            said.update(first)
            news = keys.news(reports, loop.time(), renew_every)
            if news:
                yield news
            while True:
                waiter = asyncio.ensure_future(changed.wait())
                added = asyncio.ensure_future(keys.wait_added(renew_every))
                timeout = max(0.0, renew_every - (loop.time() - last_renew))
                next_due = due()
                if next_due is not None:
                    timeout = min(timeout, max(0.0, next_due - time.time()))
                try:
                    await asyncio.wait(
                        [waiter, added, *tasks],
                        timeout=timeout,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    waiter.cancel()
                    added.cancel()
                for t in tasks:
                    if t.done():
                        t.result()  # a bug in a follower: let it out
                changed.clear()
                now = loop.time()
                renew = now - last_renew >= renew_every
                due()
                index = self._index
                wanted = [
                    k
                    for k in keys.keys()  # noqa: SIM118 (a WatchSet is not iterable)
                    if renew
                    or k not in index
                    or index[k][0] in dirty
                    or index[k] in dirty_at
                    or k in self._finished
                    or k not in said
                ]
                if len(listed) < 2:
                    continue  # NOTE: nothing is said before both lists are in
                try:
                    await self._read_back_uploads(
                        api, sorted({self._index[k][0] for k in wanted if k in self._index})
                    )
                except KubernetesError:
                    keys.failures += 1
                    continue  # NOTE: dirty stays: said at the next change or renewal
                dirty.clear()
                dirty_at.clear()
                if renew:
                    last_renew = now
                if not wanted:
                    continue
                said.update(wanted)
                seen: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
                for k in wanted:
                    where = index.get(k)
                    if where is not None and where not in seen:
                        seen[where] = list(at.get(where, {}).values())
                reports = self._reports_of(wanted, jobs, seen)
                news = keys.news(reports, now, renew_every)
                if news:
                    yield news
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    async def _follow(
        self,
        api: Api,
        what: str,
        list_fn: Any,
        args: tuple[Any, ...],
        on_event: Any,
        on_relist: Any,
        keys: WatchSet | None,
        selector: str | None = None,
    ) -> None:
        """List, then watch from the list's resourceVersion; relist after ``410 Gone``. A
        failed list or watch is counted in ``keys.failures`` and tried again after a pause."""
        selector = self._selector if selector is None else selector
        rv: str | None = None
        failures = 0
        while True:
            try:
                if rv is None:
                    body = await api.call(f"list {what}", list_fn, *args, label_selector=selector)
                    rv = str((body.get("metadata") or {}).get("resourceVersion") or "")
                    on_relist(body.get("items") or [])
                async for ev in api.watch(
                    f"watch {what}",
                    list_fn,
                    *args,
                    label_selector=selector,
                    resource_version=rv,
                    timeout_s=WATCH_TIMEOUT_S,
                ):
                    kind = ev.get("type")
                    obj = ev.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            rv = None  # too old: relist
                            break
                        raise KubernetesError(
                            f"watch {what}: {obj.get('message')}",
                            provider=self.name,
                            retryable=True,
                            status=int(obj.get("code") or 0),
                        )
                    new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if new_rv:
                        rv = str(new_rv)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        on_event(kind, obj)
                failures = 0
            except KubernetesError as e:
                if e.status == 410:
                    rv = None
                    continue
                if not e.retryable:
                    raise
                if keys is not None:
                    keys.failures += 1
                pause = e.retry_after or WATCH_BACKOFF_S[min(failures, len(WATCH_BACKOFF_S) - 1)]
                failures += 1
                await asyncio.sleep(pause)

    async def capacity_changes(self) -> AsyncIterator[str]:
        """A node watch: yields when a node appears or goes, turns Ready or not, is cordoned
        or uncordoned, or its allocatable resources, taints or pool label change."""
        api = await self._connect()
        seen: dict[str, tuple[Any, ...]] = {}
        reasons: asyncio.Queue[str] = asyncio.Queue()
        primed = False

        def signature(node: Mapping[str, Any]) -> tuple[Any, ...]:
            spec = node.get("spec") or {}
            st = node.get("status") or {}
            ready = next(
                (c.get("status") for c in st.get("conditions") or [] if c.get("type") == "Ready"),
                None,
            )
            return (
                ready,
                bool(spec.get("unschedulable")),
                json.dumps(spec.get("taints") or [], sort_keys=True),
                json.dumps(st.get("allocatable") or {}, sort_keys=True),
                json.dumps((node.get("metadata") or {}).get("labels") or {}, sort_keys=True),
            )

        def on_event(kind: str, obj: dict[str, Any]) -> None:
            name = _name(obj)
            if kind == "DELETED":
                if seen.pop(name, None) is not None:
                    reasons.put_nowait(f"node {name} removed")
                return
            sig = signature(obj)
            prev = seen.get(name)
            seen[name] = sig
            if prev is None:
                reasons.put_nowait(f"node {name} added")
            elif prev != sig:
                reasons.put_nowait(f"node {name} changed")

        def on_relist(items: list[dict[str, Any]]) -> None:
            nonlocal primed
            names = {_name(o) for o in items}
            for gone in set(seen) - names:
                on_event("DELETED", {"metadata": {"name": gone}})
            for o in items:
                if primed:
                    on_event("MODIFIED", o)
                else:
                    seen[_name(o)] = signature(o)
            primed = True

        task = asyncio.ensure_future(
            self._follow(api, "nodes", api.core.list_node, (), on_event, on_relist, None, "")
        )
        try:
            while True:
                getter = asyncio.ensure_future(reasons.get())
                await asyncio.wait([getter, task], return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    getter.cancel()
                    task.result()
                yield await getter
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- cancel / logs ------------------------------------------------------------------------

    def _refused(self, key: str) -> bool:
        """Reported NO_CAPACITY: its pod still waits and could start later (not final)."""
        done = self._finished.get(key)
        return done is not None and done.failure is FailureClass.NO_CAPACITY

    async def cancel(self, keys: Sequence[str]) -> None:
        api = await self._connect()
        live = [k for k in keys if k not in self._finished or self._refused(k)]
        if any(k not in self._index for k in live):
            await self._lookup(api, live)
        self._cancelled.update(live)
        names = sorted({self._index[k][0] for k in live if k in self._index})
        for name in names:
            if name in self._deleted:
                continue
            members = self._job_keys.get(name, ())
            if not all(
                k in self._cancelled or (k in self._finished and not self._refused(k))
                for k in members
            ):
                # NOTE: no CANCEL_MEMBER: the Job goes when all its attempts do. But a
                # refused (NO_CAPACITY) index has a pod waiting that could start later, after
                # the core placed the trial elsewhere: that pod goes now. The Job controller
                # does not replace it: with a podFailurePolicy a pod is replaced only once
                # terminal, and the deleted pod's failure fails the index
                # (backoffLimitPerIndex: 0): https://kubernetes.io/docs/concepts/workloads/
                # controllers/job/#pod-replacement-policy and #backoff-limit-per-index
                for k in live:
                    if self._index.get(k, ("", 0))[0] == name and self._refused(k):
                        await self._delete_index_pods(api, name, self._index[k][1])
                continue
            await api.call(
                f"delete Job {name}",
                api.batch.delete_namespaced_job,
                name,
                self.namespace,
                propagation_policy="Background",
                ok404=True,
            )
            await api.call(
                f"delete ConfigMap {name}",
                api.core.delete_namespaced_config_map,
                name,
                self.namespace,
                ok404=True,
            )
            self._deleted.add(name)

    async def _delete_index_pods(self, api: Api, job: str, idx: int) -> None:
        """Delete the not-yet-finished pods of completion index ``idx`` of ``job``."""
        body = await api.call(
            "list pods",
            api.core.list_namespaced_pod,
            self.namespace,
            label_selector=f"{JOB_NAME_LABEL}={job},{COMPLETION_INDEX}={idx}",
        )
        for pod in body.get("items") or []:
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            await api.call(
                f"delete pod {_name(pod)}",
                api.core.delete_namespaced_pod,
                _name(pod),
                self.namespace,
                ok404=True,
            )

    async def _pod_of(self, api: Api, key: str) -> tuple[str | None, Mapping[str, Any] | None]:
        if key not in self._index:
            await self._lookup(api, [key])
        where = self._index.get(key)
        if where is None:
            return None, None
        job, idx = where
        body = await api.call(
            "list pods",
            api.core.list_namespaced_pod,
            self.namespace,
            label_selector=f"{JOB_NAME_LABEL}={job},{COMPLETION_INDEX}={idx}",
        )
        return job, latest_pod(body.get("items") or [])

    async def logs(
        self, key: str, *, stream: LogStream = "stdout", follow: bool = False
    ) -> AsyncIterator[bytes]:
        # NOTE: Kubernetes keeps one log per container, stdout and stderr merged: both
        # streams are that log (an empty stderr would hide why an attempt failed). Once the
        # pod is gone, the wrapper's uploads (with a bucket) are the logs, one per stream.
        api = await self._connect()
        job, pod = await self._pod_of(api, key)
        if pod is None and job is not None and self.config.bucket is not None:
            await self._read_back_uploads(api, [job])
            obj = self._slots.get(key, {}).get(stream)
            data = await self._get_object(obj) if obj is not None else None
            if data is not None:
                if data:
                    yield data
                return
        while True:
            job, pod = await self._pod_of(api, key)
            if job is None:
                return
            phase = ((pod or {}).get("status") or {}).get("phase")
            started = phase in ("Running", "Succeeded", "Failed")
            if pod is not None and started:
                break
            if not follow:
                return
            report = (await self.describe([key]))[0]
            if report.state in TERMINAL_PROVIDER_STATES or report.state is ProviderState.UNKNOWN:
                return
            await asyncio.sleep(LOG_POLL_S)
        assert pod is not None
        name = _name(pod)
        if not follow:
            resp = await self._log_once(api, name)
            if resp:
                yield resp
            return
        async for chunk in api.stream(
            f"log of pod {name}",
            api.core.read_namespaced_pod_log,
            name,
            self.namespace,
            read_timeout=24 * 3600.0,
            container=CONTAINER,
            follow=True,
        ):
            yield chunk

    async def _log_once(self, api: Api, pod: str) -> bytes:
        out = b""
        async for chunk in api.stream(
            f"log of pod {pod}",
            api.core.read_namespaced_pod_log,
            pod,
            self.namespace,
            read_timeout=self.config.request_timeout,
            container=CONTAINER,
        ):
            out += chunk
        return out

    async def aclose(self) -> None:
        if self._api is not None:
            await self._api.aclose()
            self._api = None
        self._s3_client = None
        await self._s3_stack.aclose()
        self._s3_stack = contextlib.AsyncExitStack()


__all__ = ["KubernetesProvider", "KubernetesRequest"]
