"""The service's HTTP API: a Litestar application over the project's run store.

Every endpoint under ``/api/v1`` needs ``Authorization: Bearer <token>`` (401 without, or
with a token that is malformed, forged, revoked, expired or whose user is no longer
configured) and is then decided by ``auth.ALLOWED`` (403). ``/healthz`` and ``/readyz`` are
open. Bodies are msgspec Structs that forbid unknown fields; a body that does not decode is a
400 naming the field, one over ``[service] max_body`` a 413; a bad input never reaches the
store. The OpenAPI document is at ``/schema/openapi.json``.

Handlers are synchronous and run in worker threads: the store and the control plane's
handles are blocking, and a slow submission must not stall reads.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    SerializationException,
    ValidationException,
)
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Components, OpenAPIType, Schema, SecurityScheme
from litestar.params import FromQuery, PathParameter, QueryParameter, RequestBody
from litestar.plugins import OpenAPISchemaPlugin
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from stowplan.errors import SpecError, StowplanError
from stowplan.provenance.query import LineageGraph
from stowplan.provenance.records import LedgerEntry, RunRecord
from stowplan.provenance.store import RunStore
from stowplan.providers.base import LogStream
from stowplan.scheduler.states import FINAL, TaskState
from stowplan.service import dashboard, metrics, views
from stowplan.service.api import (
    API_PREFIX,
    EXPERIMENT_REF_PATTERN,
    FILTER_PATTERN,
    LINEAGE_TARGET_PATTERN,
    LOG_EVENT_CHUNK,
    LOG_EVENT_END,
    LOG_EVENT_ERROR,
    PATTERN_TEXT,
    REQUEST_ID_PATTERN,
    RUN_REF_PATTERN,
    CancelExperimentResponse,
    CancelRequest,
    CancelResponse,
    DecideRequest,
    DecideResponse,
    ErrorBody,
    Health,
    PlanRequest,
    PlanResponse,
    ReplayRequest,
    ReplayStatus,
    SubmitRequest,
    SubmitResponse,
    TeamUse,
    files_clash,
)
from stowplan.service.auth import Action, Principal, Scope, allowed, principal_of, scope_of
from stowplan.service.people import People
from stowplan.service.submit import ConflictError, NotRunningError, Replayer, Submitter
from stowplan.spec.loader import LoadedProject

log = logging.getLogger(__name__)

__all__ = ["ServiceState", "create_app"]


class ServiceState:
    """What the application serves: the project, its store, people and control plane."""

    def __init__(
        self,
        *,
        project: LoadedProject,
        state_dir: Path,
        store: RunStore,
        people: People,
        plane: Any | None = None,
        keepalive_s: float | None = None,
    ) -> None:
        self.project = project
        self.keepalive_s = KEEPALIVE_S if keepalive_s is None else keepalive_s
        """Seconds between keep-alive comments on an idle log stream."""
        self.config = project.config.service
        self.state_dir = state_dir
        self.store = store
        self.people = people
        self.plane = plane
        self.submitter = Submitter(root=Path(project.root), people=people, plane=plane)
        self.replayer = Replayer(project=project, people=people, plane=plane)

    def visible(self, who: Principal) -> views.Visible:
        if allowed(who.role, Action.READ, Scope.OTHER):
            return None
        mine = self.people.experiments_of({who.team})
        return mine.__contains__

    def sharing(self, who: Principal) -> list[tuple[str, dict[str, Any]]]:
        """Each limited team's use against its limits (``QueueActor.sharing``), by team: the
        caller's own team, every team for an admin; none without a control plane."""
        if self.plane is None:
            return []
        everyone = allowed(who.role, Action.READ, Scope.OTHER)
        return [
            (team, use)
            for team, use in sorted(self.plane.sharing().items())
            if everyone or team == who.team
        ]

    def check(self, who: Principal, action: Action, experiment_id: str) -> None:
        scope = scope_of(who, self.people.owners(experiment_id))
        if not allowed(who.role, action, scope):
            whose = {
                Scope.OWN: "your own",
                Scope.TEAM: "your team's",
                Scope.OTHER: "another team's",
            }[scope]
            raise PermissionDeniedException(
                f"{who.user} ({who.role} of team {who.team}) may not {action.value} {whose} runs"
            )


def _state(request: Request[Any, Any, Any]) -> ServiceState:
    state: ServiceState = request.app.state["service"]
    return state


def _principal(request: Request[Any, Any, Any]) -> Principal:
    state = _state(request)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise NotAuthorizedException(
            "no API token: send `Authorization: Bearer <token>` "
            "(an admin creates one with `stowplan token create`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    user, why = state.people.check_token(token.strip())
    if user is None:
        raise NotAuthorizedException(why, headers={"WWW-Authenticate": "Bearer"})
    who = principal_of(state.config, user)
    if who is None:
        raise NotAuthorizedException(
            f"user {user!r} is not configured under [service.users] any more",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return who


def _ref(value: str, pattern: str, what: str) -> str:
    if not re.match(pattern, value):
        raise ValidationException(
            f"{value[:80]!r} is not {what}: "
            + (
                "give 6 to 64 hex digits of the run id"
                if pattern == RUN_REF_PATTERN
                else "give an experiment name or id (letters, digits, '_', '.', '-')"
            )
        )
    return value


def _writable(req: SubmitRequest | PlanRequest) -> None:
    """400 for files that cannot all be written beside the experiment file."""
    clash = files_clash(req.filename, req.files)
    if clash is not None:
        raise ValidationException(f"invalid request: $.files: {clash}")


def _resolve_run(state: ServiceState, ref: str) -> str:
    try:
        return state.store.resolve_run(_ref(ref, RUN_REF_PATTERN, "a run id"))
    except KeyError:
        raise NotFoundException(f"no run {ref!r}") from None
    except ValueError as e:
        raise ValidationException(str(e.args[0] if e.args else e)) from None


# -- the OpenAPI document says what the handlers hold requests to -----------------------------

ERRORS: Final = {
    status: ResponseSpec(ErrorBody, description=text, generate_examples=False)
    for status, text in (
        (400, "the request is malformed: the detail names the field and what it must be"),
        (401, "no API token, or one that is malformed, forged, revoked or expired"),
        (403, "the caller's role may not do this, or not to another team's runs"),
        (404, "no such experiment or run"),
        (409, "a request id used before for another submission, or a provider gone"),
        (413, "the body is larger than [service] max_body"),
        (503, "this service runs no control plane, or it is failing"),
    )
}
"""Every error answer an ``/api/v1`` endpoint may give: an ``ErrorBody``."""

RunRef = Annotated[
    str, PathParameter(description="a run id (prefix)", schema_extra={"pattern": RUN_REF_PATTERN})
]
ExperimentRef = Annotated[
    str,
    PathParameter(
        description="an experiment's name or id", schema_extra={"pattern": EXPERIMENT_REF_PATTERN}
    ),
]
LineageTarget = Annotated[
    str,
    PathParameter(
        description="a run id or artifact hash (prefix), or an output's name",
        schema_extra={"pattern": LINEAGE_TARGET_PATTERN},
    ),
]
FindText = Annotated[str | None, QueryParameter(schema_extra={"pattern": FILTER_PATTERN})]
STATES: Final = sorted({v for s in TaskState for v in (s.value, s.value.lower())})
"""``find --state``: a run state, in either case."""
PARAM_FILTER_PATTERN: Final = (
    r"\A *[A-Za-z_][\w.-]* *(==|!=|>=|<=|>|<|=) *[^<>=!\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*\Z"
)
"""``find --param``: NAME OP VALUE, as ``provenance.query.parse_param_filter`` reads it and
with no control character (``FILTER_PATTERN``)."""


@functools.cache
def strict_decoder(t: Any) -> msgspec.json.Decoder[Any] | None:
    """The decoder of a request body type (a Struct that forbids unknown fields, as every
    ``*Request`` of ``api`` does), decoding as msgspec does everywhere else: strictly.

    NOTE: Litestar converts a body to its type leniently (``"json": 0`` becomes ``False``,
    ``"budget": "5"`` becomes ``5.0``); ``_strict_body`` refuses what the document does not
    allow before the handler runs."""
    strict = isinstance(t, type) and issubclass(t, msgspec.Struct)
    if strict and t.__struct_config__.forbid_unknown_fields:
        return msgspec.json.Decoder(t)
    return None


async def _strict_body(request: Request[Any, Any, Any]) -> None:
    """400 for a body that its type's strict decoder refuses, naming the field."""
    field = request.route_handler.parsed_data_field
    decoder = strict_decoder(field.annotation) if field is not None else None
    if decoder is None:
        return
    raw = await request.body()
    try:
        decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise ValidationException(f"invalid request: {_in_words(str(e))}") from None
    except msgspec.DecodeError as e:
        raise ValidationException(f"the body is not valid JSON (malformed): {e}") from None


def _in_words(msg: str) -> str:
    """msgspec's ``message - at `$.path``` as ``$.path: message``, a pattern said in words."""
    text, _, where = msg.partition(" - at ")
    for pattern, words in PATTERN_TEXT.items():
        if repr(pattern) in text:
            text = words
    where = where.strip("`").replace("` in `", " in ")
    return f"{where}: {text}" if where else text


class RequestSchemas(OpenAPISchemaPlugin):
    """The request Structs in the document as msgspec decodes them: no unknown field
    (``forbid_unknown_fields``), the files' names with their pattern, their bytes base64."""

    def is_plugin_supported_field(self, field_definition: Any) -> bool:
        return strict_decoder(field_definition.annotation) is not None

    def to_openapi_schema(self, field_definition: Any, schema_creator: Any) -> Schema:
        # the schema Litestar makes of any Struct (the next plugin for it), completed
        struct = next(
            p
            for p in schema_creator.plugins
            if p is not self and schema_creator.plugin_supports_field(p, field_definition)
        )
        schema: Schema = struct.to_openapi_schema(field_definition, schema_creator)
        schema.additional_properties = False
        info = msgspec.inspect.type_info(field_definition.annotation)
        for f in info.fields if isinstance(info, msgspec.inspect.StructType) else ():
            t = f.type
            prop = (schema.properties or {}).get(f.encode_name)
            number = _number(t)
            if isinstance(prop, Schema) and number is not None:
                # NOTE: Litestar leaves out a bound of 0 (``ge=0``)
                prop.minimum = number.ge if prop.minimum is None else prop.minimum
                prop.maximum = number.le if prop.maximum is None else prop.maximum
                if number.gt is not None and prop.exclusive_minimum is None:
                    prop.exclusive_minimum = number.gt
                if number.lt is not None and prop.exclusive_maximum is None:
                    prop.exclusive_maximum = number.lt
            t = t.type if isinstance(t, msgspec.inspect.Metadata) else t
            if isinstance(t, msgspec.inspect.ListType) and isinstance(prop, Schema):
                # NOTE: Litestar leaves out the items' pattern and the list's length bounds
                item = t.item_type
                item = item.type if isinstance(item, msgspec.inspect.Metadata) else item
                if isinstance(item, msgspec.inspect.StrType) and item.pattern:
                    prop.items = Schema(
                        type=OpenAPIType.STRING,
                        pattern=item.pattern,
                        min_length=item.min_length,
                        max_length=item.max_length,
                    )
                    prop.min_items = t.min_length
                    prop.max_items = t.max_length
            if not isinstance(t, msgspec.inspect.DictType):
                continue
            key = t.key_type
            key = key.type if isinstance(key, msgspec.inspect.Metadata) else key
            if not isinstance(key, msgspec.inspect.StrType):
                continue
            if isinstance(t.value_type, msgspec.inspect.BytesType):
                (schema.properties or {})[f.encode_name] = Schema(
                    type=OpenAPIType.OBJECT,
                    property_names=Schema(type=OpenAPIType.STRING, pattern=key.pattern),
                    additional_properties=Schema(
                        type=OpenAPIType.STRING, content_encoding="base64"
                    ),
                    description="file contents (base64) by relative path",
                )
            elif key.pattern and isinstance(prop, Schema):
                prop.property_names = Schema(type=OpenAPIType.STRING, pattern=key.pattern)
                value = _number(t.value_type)
                if value is not None:
                    prop.additional_properties = Schema(
                        type=OpenAPIType.INTEGER
                        if isinstance(value, msgspec.inspect.IntType)
                        else OpenAPIType.NUMBER,
                        minimum=value.ge,
                        maximum=value.le,
                    )
        return schema


def _number(t: msgspec.inspect.Type) -> msgspec.inspect.FloatType | msgspec.inspect.IntType | None:
    """The number type in ``t`` (itself, or in its Metadata or ``| None``), if any."""
    if isinstance(t, msgspec.inspect.Metadata):
        return _number(t.type)
    if isinstance(t, msgspec.inspect.UnionType):
        found = [n for n in map(_number, t.types) if n is not None]
        return found[0] if len(found) == 1 else None
    return t if isinstance(t, msgspec.inspect.FloatType | msgspec.inspect.IntType) else None


# -- endpoints ------------------------------------------------------------------------------


@get("/healthz", sync_to_thread=False, security=[{}])
def healthz() -> Health:
    """The process answers."""
    return Health(ok=True)


@get(
    "/readyz",
    sync_to_thread=True,
    responses={503: ResponseSpec(Health, description="not ready, and why")},
    security=[{}],
)
def readyz(request: Request[Any, Any, Any]) -> Response[Health]:
    """The store reads and the control plane answers: submissions can be taken."""
    state = _state(request)
    try:
        state.store.list_experiments()
    except Exception as e:  # any failure means "not ready", and says why
        return Response(Health(ok=False, detail=f"store: {e}"), status_code=503)
    if state.plane is None:
        return Response(Health(ok=False, detail="no control plane runs"), status_code=503)
    try:
        state.plane.progress([])
    except StowplanError as e:
        return Response(Health(ok=False, detail=f"control plane: {e}"), status_code=503)
    return Response(Health(ok=True), status_code=HTTP_200_OK)


@get(f"{API_PREFIX}/experiments", sync_to_thread=True, responses=ERRORS)
def list_experiments(
    request: Request[Any, Any, Any], who: NamedDependency[Principal]
) -> list[views.ExperimentSummary]:
    """The experiments the caller may read, newest first (``stowplan ls``)."""
    state = _state(request)
    return views.list_experiments(state.store, visible=state.visible(who))


@get(f"{API_PREFIX}/experiments/{{ref:str}}/status", sync_to_thread=True, responses=ERRORS)
def experiment_status(
    request: Request[Any, Any, Any], who: NamedDependency[Principal], ref: ExperimentRef
) -> list[views.RunStatus]:
    """The newest replicate of each trial of the experiment named (or with id) ``ref``."""
    state = _state(request)
    _ref(ref, EXPERIMENT_REF_PATTERN, "an experiment name or id")
    try:
        runs = views.experiment_runs(state.store, ref, visible=state.visible(who))
    except SpecError as e:
        raise NotFoundException(e.message) from None
    except PermissionError as e:
        raise PermissionDeniedException(str(e)) from None
    return views.status_rows(state.store, runs)


@get(f"{API_PREFIX}/runs/{{ref:str}}", sync_to_thread=True, responses=ERRORS)
def show_run(
    request: Request[Any, Any, Any], who: NamedDependency[Principal], ref: RunRef
) -> views.RunDetail:
    """Everything recorded about one run (``stowplan show``)."""
    state = _state(request)
    run_id = _resolve_run(state, ref)
    run = state.store.get_runs([run_id])[run_id]
    state.check(who, Action.READ, run.experiment_id)
    return views.run_detail(
        state.store,
        run_id,
        providers=dict(state.project.config.providers),
        state_dir=state.state_dir,
    )


@post(
    f"{API_PREFIX}/experiments",
    sync_to_thread=True,
    responses={
        200: ResponseSpec(SubmitResponse, description="the first answer to this request id"),
        **ERRORS,
    },
)
def submit(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    data: RequestBody[SubmitRequest],
) -> Response[SubmitResponse]:
    """Submit an experiment: 201 when this request created it, 200 with the first answer
    when the same ``request_id`` was submitted before."""
    state = _state(request)
    if not allowed(who.role, Action.SUBMIT, Scope.OWN):
        raise PermissionDeniedException(f"{who.user} is a {who.role}: a viewer cannot submit")
    _writable(data)
    answer, created = state.submitter.submit(who, data)
    return Response(answer, status_code=HTTP_201_CREATED if created else HTTP_200_OK)


@post(
    f"{API_PREFIX}/runs/{{ref:str}}/cancel",
    sync_to_thread=True,
    status_code=HTTP_200_OK,
    responses=ERRORS,
)
def cancel_run(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    ref: RunRef,
    data: RequestBody[CancelRequest],
) -> CancelResponse:
    """Cancel one run; the ledger names the caller."""
    from stowplan.session import run_ids_detail

    state = _state(request)
    run_id = _resolve_run(state, ref)
    run = state.store.get_runs([run_id])[run_id]
    state.check(who, Action.CANCEL, run.experiment_id)
    if run.state in FINAL:
        return CancelResponse(run_id=run_id, cancelled=0)
    if state.plane is None:
        raise NotRunningError("this service runs no control plane: nothing was cancelled")
    state.store.append_ledger(
        who=who.user,
        action="cancel",
        target=run_id,
        why=data.why,
        details={"target": ref, "team": who.team, "via": "service", **run_ids_detail([run_id])},
    )
    n = state.plane.cancel([run_id], data.why)
    return CancelResponse(run_id=run_id, cancelled=int(n))


def _decide(
    request: Request[Any, Any, Any],
    who: Principal,
    ref: str,
    why: str,
    approve: bool,
) -> DecideResponse:
    """Approve or reject one run waiting in AWAITING_APPROVAL; the ledger names the caller,
    the decision and why (written before the control plane acts, as for cancel)."""
    from stowplan.session import run_ids_detail

    state = _state(request)
    run_id = _resolve_run(state, ref)
    run = state.store.get_runs([run_id])[run_id]
    state.check(who, Action.APPROVE, run.experiment_id)
    decision: Literal["approve", "reject"] = "approve" if approve else "reject"
    if run.state != TaskState.AWAITING_APPROVAL:
        return DecideResponse(run_id=run_id, decision=decision, decided=0, state=run.state)
    if state.plane is None:
        raise NotRunningError("this service runs no control plane: nothing was decided")
    state.store.append_ledger(
        who=who.user,
        action="approval",
        target=run_id,
        why=why,
        details={
            "decision": decision,
            "target": ref,
            "team": who.team,
            "via": "service",
            **run_ids_detail([run_id]),
        },
    )
    verb = "approved" if approve else "rejected"
    n = state.plane.decide([run_id], approve, f"{verb} by {who.user}: {why}")
    now = (TaskState.READY if approve else TaskState.CANCELLED) if n else run.state
    return DecideResponse(run_id=run_id, decision=decision, decided=int(n), state=now)


@post(
    f"{API_PREFIX}/runs/{{ref:str}}/approve",
    sync_to_thread=True,
    status_code=HTTP_200_OK,
    responses=ERRORS,
)
def approve_run(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    ref: RunRef,
    data: RequestBody[DecideRequest],
) -> DecideResponse:
    """Approve a run waiting for approval (a budget, a restricted pool): it is placed again
    and neither holds it. For its team's admins and lab admins."""
    return _decide(request, who, ref, data.why, approve=True)


@post(
    f"{API_PREFIX}/runs/{{ref:str}}/reject",
    sync_to_thread=True,
    status_code=HTTP_200_OK,
    responses=ERRORS,
)
def reject_run(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    ref: RunRef,
    data: RequestBody[DecideRequest],
) -> DecideResponse:
    """Reject a run waiting for approval: it is cancelled with the reason."""
    return _decide(request, who, ref, data.why, approve=False)


@post(
    f"{API_PREFIX}/replays",
    sync_to_thread=True,
    responses={
        200: ResponseSpec(ReplayStatus, description="the replay this request id started before"),
        **ERRORS,
    },
)
def start_replay(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    data: RequestBody[ReplayRequest],
) -> Response[ReplayStatus]:
    """Replay recorded runs the caller may read, from the service's store, on its control
    plane: 201 once the replay's runs are recorded and queued (``GET /api/v1/replays/{id}``
    follows it to its verdict), 200 with the first answer for a request id used before."""
    state = _state(request)
    if not allowed(who.role, Action.SUBMIT, Scope.OWN):
        raise PermissionDeniedException(f"{who.user} is a {who.role}: a viewer cannot replay")

    def may_read(experiment_id: str) -> None:
        state.check(who, Action.READ, experiment_id)

    answer, created = state.replayer.start(who, data, may_read)
    return Response(answer, status_code=HTTP_201_CREATED if created else HTTP_200_OK)


@get(f"{API_PREFIX}/replays/{{request_id:str}}", sync_to_thread=True, responses=ERRORS)
def replay_status(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    request_id: Annotated[
        str,
        PathParameter(
            description="the replay's request id", schema_extra={"pattern": REQUEST_ID_PATTERN}
        ),
    ],
) -> ReplayStatus:
    """A replay started through this service (by the caller; an admin sees every one):
    ``done`` with its ``outcome`` once its runs ended."""
    state = _state(request)
    if not re.match(REQUEST_ID_PATTERN, request_id):
        raise ValidationException(
            f"{request_id[:80]!r} is not a request id: {PATTERN_TEXT[REQUEST_ID_PATTERN]}"
        )
    everyone = allowed(who.role, Action.READ, Scope.OTHER)
    got = state.replayer.status(who, request_id, everyone=everyone)
    if got is None:
        raise NotFoundException(
            f"no replay {request_id!r} of yours in this service (replays are kept until it "
            "restarts)"
        )
    return got


@post(f"{API_PREFIX}/plan", sync_to_thread=True, status_code=HTTP_200_OK, responses=ERRORS)
def plan(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    data: RequestBody[PlanRequest],
) -> PlanResponse:
    """What ``stowplan plan`` shows for an experiment on the lab's providers; nothing is
    submitted or recorded. For those who may submit."""
    state = _state(request)
    if not allowed(who.role, Action.SUBMIT, Scope.OWN):
        raise PermissionDeniedException(
            f"{who.user} is a {who.role}: only those who may submit may plan"
        )
    _writable(data)
    answer = state.submitter.plan(who, data)
    if data.explain is None:
        return answer
    queue = queue_explanation(state, who, data.explain, metrics.metrics_of(request.app.state).store)
    if not queue:
        return answer
    output = answer.output
    if not data.json:  # the JSON document stays one document: the lines are in ``queue``
        output = output + ("" if not output or output.endswith("\n") else "\n")
        output += "\n".join(queue) + "\n"
    return msgspec.structs.replace(answer, output=output, queue=queue)


WAITS_IN_QUEUE: Final = ("PENDING", "READY", "AWAITING_APPROVAL", "RETRYING")
"""The states of a run that waits in the service's queue (``plan --explain`` says why)."""
AHEAD_COUNTED: Final = 5000
"""``plan --explain`` weighs a waiting run against at most this many of the oldest others."""


def queue_explanation(state: ServiceState, who: Principal, prefix: str, reader: Any) -> list[str]:
    """Why the run ``prefix`` names waits in the service's queue now, for ``plan --explain``:
    the hold the scheduler recorded (an approval, a team's quota, a budget), the team's use
    against its limits, and the waiting runs ahead of it by priority and by fair share. No
    lines for a run the caller may not read, that is not in the store, or that does not wait."""
    try:
        run_id = state.store.resolve_run(prefix)
    except (KeyError, ValueError):
        return []
    run = state.store.get_runs([run_id])[run_id]
    scope = scope_of(who, state.people.owners(run.experiment_id))
    if not allowed(who.role, Action.READ, scope) or run.state not in WAITS_IN_QUEUE:
        return []
    mine = _instance(run)
    team, priority = mine.get("team") or "", int(mine.get("priority") or 0)
    head = (
        f"in the service's queue now: run {run_id[:12]} ({run.task}[{run.index}]"
        + (f", team {team}" if team else "")
        + (f", user {mine['user']}" if mine.get("user") else "")
        + f", priority {priority}) is {run.state}"
    )
    lines = [head]
    if run.state == "AWAITING_APPROVAL":
        lines.append(
            f"  held for approval: {run.reason or 'policy asks for it'}; a team admin of "
            f"{team or 'its team'} or an admin decides: stowplan approve {run_id[:12]} "
            "--why ... (or reject)"
        )
    elif run.state == "READY" and run.reason:
        lines.append(f"  held back: {run.reason}")
    elif run.state == "READY":
        lines.append(
            "  no quota or approval holds it: it waits for capacity (the last placement found "
            "no pool with room for it) behind the runs placed first"
        )
    elif run.state == "PENDING":
        lines.append("  waits on its upstream runs, or for the queue to take it")
    else:
        lines.append(f"  retrying after attempt {run.attempts} failed: {run.reason or run.failure}")
    uses = dict(state.plane.sharing()) if state.plane is not None else {}
    if team in uses:
        lines.append("  " + _team_use_text(team, uses[team]))
    lines += _ahead(state, reader, run_id, team, priority, uses)
    return lines


def _instance(run: RunRecord) -> dict[str, Any]:
    """The run's ``TaskInstance`` as recorded for the queue (team, user, priority)."""
    payload = run.task_spec.get("payload")
    inst = payload.get("instance") if isinstance(payload, dict) else None
    return inst if isinstance(inst, dict) else {}


def _team_use_text(team: str, use: dict[str, Any]) -> str:
    from stowplan.scheduler.share import span_text

    limits = use["limits"]
    holds = ", ".join(f"{m} {n}" for m, n in sorted(use["holds"].items())) or "no GPU"
    parts = [f"team {team} holds {holds}"]
    if limits.get("max_gpus"):
        parts.append("max " + ", ".join(f"{m} {n}" for m, n in sorted(limits["max_gpus"].items())))
    if limits.get("guaranteed_gpus"):
        parts.append(
            "guaranteed "
            + ", ".join(f"{m} {n}" for m, n in sorted(limits["guaranteed_gpus"].items()))
        )
    hours = f"GPU-hours {use['gpu_hours']:,.2f}"
    if limits.get("gpu_hours") is not None:
        hours += f" of {limits['gpu_hours']:,g} per {span_text(limits['window_s'])}"
    parts.append(hours)
    parts.append(f"weight {limits.get('weight', 1.0):g}")
    return "; ".join(parts)


def _ahead(
    state: ServiceState,
    reader: Any,
    run_id: str,
    team: str,
    priority: int,
    uses: dict[str, Any],
) -> list[str]:
    """The waiting runs the scheduler takes before ``run_id``: higher priority first (across
    teams, as stated), then, at the same priority, teams that used less over their weight."""
    marks = ", ".join("?" * len(WAITS_IN_QUEUE))
    rows = reader.query(
        f"SELECT run_id FROM runs WHERE state IN ({marks}) AND run_id != ? "
        f"ORDER BY created_at, run_id LIMIT {AHEAD_COUNTED}",
        (*WAITS_IN_QUEUE, run_id),
    )
    others = state.store.get_runs([r[0] for r in rows])

    def share(t: str) -> float | None:
        use = uses.get(t)
        if use is None:
            return None
        return float(use["gpu_hours"]) / float(use["limits"].get("weight") or 1.0)

    mine = share(team)
    higher: dict[str, int] = {}
    fairer: dict[str, int] = {}
    for other in others.values():
        inst = _instance(other)
        p, t = int(inst.get("priority") or 0), inst.get("team") or "no team"
        if p > priority:
            higher[t] = higher.get(t, 0) + 1
        elif p == priority and t != team and mine is not None:
            theirs = share(t)
            if theirs is not None and theirs < mine:
                fairer[t] = fairer.get(t, 0) + 1
    out = []
    if higher:
        out.append(
            f"  ahead of it by priority: {sum(higher.values())} waiting runs of higher priority ("
            + ", ".join(f"team {t}: {n}" for t, n in sorted(higher.items()))
            + ")"
        )
    if fairer:
        out.append(
            f"  ahead of it by fair share: {sum(fairer.values())} waiting runs of priority "
            f"{priority} of teams that used fewer GPU-hours over their weight ("
            + ", ".join(f"team {t}: {n}" for t, n in sorted(fairer.items()))
            + ")"
        )
    if not higher and not fairer:
        out.append("  no waiting run is ahead of it by priority or fair share")
    if len(others) >= AHEAD_COUNTED:
        out.append(f"  (weighed against the {AHEAD_COUNTED} oldest waiting runs)")
    return out


@post(
    f"{API_PREFIX}/experiments/{{ref:str}}/cancel",
    sync_to_thread=True,
    status_code=HTTP_200_OK,
    responses=ERRORS,
)
def cancel_experiment(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    ref: ExperimentRef,
    data: RequestBody[CancelRequest],
) -> CancelExperimentResponse:
    """Cancel every unfinished run of the experiment named (or with id) ``ref``; refused
    (403, nothing cancelled) unless the caller may cancel every one of them."""
    from stowplan.session import run_ids_detail

    state = _state(request)
    _ref(ref, EXPERIMENT_REF_PATTERN, "an experiment name or id")
    try:
        runs = views.experiment_runs(state.store, ref, visible=state.visible(who))
    except SpecError as e:
        raise NotFoundException(e.message) from None
    except PermissionError as e:
        raise PermissionDeniedException(str(e)) from None
    for experiment_id in sorted({r.experiment_id for r in runs}):
        state.check(who, Action.CANCEL, experiment_id)
    open_ids = sorted(r.run_id for r in runs if r.state not in FINAL)
    if not open_ids:
        return CancelExperimentResponse(experiment=ref, cancelled=0, run_ids=[])
    if state.plane is None:
        raise NotRunningError("this service runs no control plane: nothing was cancelled")
    ids = {r.experiment_id for r in runs}
    state.store.append_ledger(
        who=who.user,
        action="cancel",
        target=ids.pop() if len(ids) == 1 else ref,
        why=data.why,
        details={"target": ref, "team": who.team, "via": "service", **run_ids_detail(open_ids)},
    )
    n = state.plane.cancel(open_ids, data.why)
    return CancelExperimentResponse(experiment=ref, cancelled=int(n), run_ids=open_ids)


@get(
    f"{API_PREFIX}/runs/{{ref:str}}/logs",
    sync_to_thread=True,
    responses=ERRORS,
    media_type="text/event-stream",
)
def run_logs(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    ref: RunRef,
    stream: FromQuery[Literal["stdout", "stderr"]] = "stdout",
    attempt: Annotated[int | None, QueryParameter(ge=1, le=1_000_000)] = None,
    follow: FromQuery[bool] = False,
) -> ServerSentEvent:
    """A run's output as server-sent events (``stowplan logs [-f]``): ``chunk`` events, each
    a base64 piece of the log whose ``id`` is the byte offset it ends at, then ``end``.

    A client that lost the connection sends the last ``id`` it got as ``Last-Event-ID`` and
    gets the log from that byte on: nothing twice, nothing missed. While the log is quiet, a
    ``: keep-alive`` comment comes every ``KEEPALIVE_S`` seconds."""
    state = _state(request)
    run_id = _resolve_run(state, ref)
    run = state.store.get_runs([run_id])[run_id]
    state.check(who, Action.READ, run.experiment_id)
    offset = _last_event_id(request)
    attempts = state.store.attempts_for([run_id]).get(run_id, [])
    if not attempts:
        raise NotFoundException(f"run {run_id[:12]} has no attempts yet: wait until it starts")
    if attempt is not None:
        chosen = [a for a in attempts if a.attempt == attempt]
        if not chosen:
            raise NotFoundException(
                f"run {run_id[:12]} has no attempt {attempt} (attempts: "
                + ", ".join(str(a.attempt) for a in attempts)
                + ")"
            )
        att = chosen[0]
    else:
        att = attempts[-1]
    cfg = state.project.config.providers.get(att.provider)
    if cfg is None:
        raise HTTPException(
            status_code=409,
            detail=f"provider {att.provider!r} of this run is no longer configured on the service",
        )
    events = _log_events(att.provider, cfg, state.state_dir, att.key, stream, follow, offset)
    return ServerSentEvent(
        _with_keepalive(events, state.keepalive_s),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


MAX_OFFSET = 1 << 53

KEEPALIVE_S = 15.0
"""How often a log stream with nothing new to send sends a comment (``: keep-alive``), so
that proxies and load balancers do not cut a quiet ``logs -f`` as idle (nginx's default
``proxy_read_timeout`` is 60 s), and a client that went away is noticed."""

KEEPALIVE = ServerSentEventMessage(data=None, comment="keep-alive")


async def _with_keepalive(
    events: AsyncIterator[ServerSentEventMessage], every: float
) -> AsyncIterator[ServerSentEventMessage]:
    """``events``, with ``KEEPALIVE`` whenever none came for ``every`` seconds.

    NOTE: ``events`` is iterated to its end in one task of its own, feeding a queue, rather
    than awaited step by step under a timeout: a timeout would cancel it mid-read, and the
    driver's cancel scopes must be left in the task that entered them. The task ends with
    this generator (a client that leaves closes it)."""
    import asyncio

    queue: asyncio.Queue[tuple[ServerSentEventMessage | None, BaseException | None]]
    queue = asyncio.Queue(maxsize=4)

    async def pump() -> None:
        try:
            async for ev in events:
                await queue.put((ev, None))
        except Exception as e:  # handed to the reader, raised there
            await queue.put((None, e))
            return
        await queue.put((None, None))

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            try:
                ev, error = await asyncio.wait_for(queue.get(), timeout=every)
            except TimeoutError:
                yield KEEPALIVE
                continue
            if error is not None:
                raise error
            if ev is None:
                return
            yield ev
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _last_event_id(request: Request[Any, Any, Any]) -> int:
    raw = request.headers.get("last-event-id")
    if raw is None or raw == "":
        return 0
    if not raw.isascii() or not raw.isdigit() or int(raw) > MAX_OFFSET:
        raise ValidationException(
            f"Last-Event-ID {raw[:40]!r} is not a byte offset: send back the id of the last "
            "event received (a whole number), or none to start from the beginning"
        )
    return int(raw)


async def _log_events(
    provider: str,
    cfg: Any,
    state_dir: Path,
    key: str,
    stream: LogStream,
    follow: bool,
    offset: int,
) -> AsyncIterator[ServerSentEventMessage]:
    """The log from byte ``offset`` on, one event per chunk the driver yields."""
    from stowplan.providers.registry import make_provider

    pos = 0
    try:
        async with make_provider(provider, cfg, state_dir=state_dir) as drv:
            async for chunk in drv.logs(key, stream=stream, follow=follow):
                start, pos = pos, pos + len(chunk)
                if pos <= offset:
                    continue  # the client has it already
                piece = chunk[max(0, offset - start) :]
                yield ServerSentEventMessage(
                    data=base64.b64encode(piece).decode(), event=LOG_EVENT_CHUNK, id=pos
                )
    except StowplanError as e:
        log.warning("logs of %s: %s", key, e)
        yield ServerSentEventMessage(data=str(e), event=LOG_EVENT_ERROR, id=max(pos, offset))
        return
    yield ServerSentEventMessage(data="", event=LOG_EVENT_END, id=max(pos, offset))


def _filter(value: str | None, name: str) -> str | None:
    if value is not None and not re.match(FILTER_PATTERN, value):
        raise ValidationException(f"{name}: {PATTERN_TEXT[FILTER_PATTERN]}")
    return value


@get(f"{API_PREFIX}/runs", sync_to_thread=True, responses=ERRORS)
def find_runs(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    data_: Annotated[
        str | None, QueryParameter(name="data", schema_extra={"pattern": FILTER_PATTERN})
    ] = None,
    gpu: FindText = None,
    code: FindText = None,
    param: Annotated[
        list[str] | None,
        QueryParameter(
            max_items=32,
            schema_extra={
                "items": Schema(
                    type=OpenAPIType.STRING, pattern=PARAM_FILTER_PATTERN, max_length=256
                )
            },
        ),
    ] = None,
    experiment: FindText = None,
    task: FindText = None,
    state_: Annotated[
        str | None, QueryParameter(name="state", schema_extra={"enum": [*STATES, None]})
    ] = None,
    package: FindText = None,
    host: FindText = None,
    artifact: FindText = None,
) -> list[RunRecord]:
    """Runs by any provenance field (``stowplan find``), of experiments the caller may read;
    every filter given must match."""
    from stowplan.provenance.query import Filter, parse_param_filter
    from stowplan.provenance.query import find_runs as find

    if state_ is not None and state_.upper() not in {s.value for s in TaskState}:
        raise ValidationException(
            f"state {state_[:40]!r} is not a run state: use one of "
            + ", ".join(s.value for s in TaskState)
        )
    for name, value in (
        ("data", data_),
        ("gpu", gpu),
        ("code", code),
        ("experiment", experiment),
        ("task", task),
        ("package", package),
        ("host", host),
        ("artifact", artifact),
    ):
        _filter(value, name)
    params = [parse_param_filter(_filter(p, "param") or "") for p in param or []]
    flt = Filter(
        data=data_,
        gpu=gpu,
        code=code,
        params=params,
        experiment=experiment,
        task=task,
        state=state_.upper() if state_ is not None else None,
        package=package,
        host=host,
        artifact=artifact,
    )
    state = _state(request)
    return views.visible_runs(find(state.store, flt), state.visible(who))


@get(f"{API_PREFIX}/lineage/{{target:str}}", sync_to_thread=True, responses=ERRORS)
def run_lineage(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    target: LineageTarget,
    direction: FromQuery[Literal["up", "down", "both"]] = "up",
    depth: Annotated[int | None, QueryParameter(ge=1, le=1000)] = None,
) -> LineageGraph:
    """What a run or artifact came from, or what came from it (``stowplan lineage``): only
    runs of experiments the caller may read, and what they lead to."""
    from stowplan.provenance.query import lineage

    if not re.match(LINEAGE_TARGET_PATTERN, target):
        raise ValidationException(f"{target[:80]!r} {PATTERN_TEXT[LINEAGE_TARGET_PATTERN]}")
    state = _state(request)
    graph = lineage(state.store, target, direction=direction, depth=depth)
    try:
        return views.visible_lineage(state.store, graph, state.visible(who))
    except PermissionError as e:
        raise PermissionDeniedException(f"{target[:80]!r}: {e}") from None


@get(f"{API_PREFIX}/diff/{{a:str}}/{{b:str}}", sync_to_thread=True, responses=ERRORS)
def diff_runs(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    a: RunRef,
    b: RunRef,
) -> dict[str, Any]:
    """What changed between two runs, grouped (``stowplan diff``); both must be readable."""
    from stowplan.provenance.imports import used_records
    from stowplan.provenance.query import diff_runs as diff
    from stowplan.provenance.query import load_view

    state = _state(request)
    ids = [_resolve_run(state, a), _resolve_run(state, b)]
    runs = state.store.get_runs(ids)
    for rid in ids:
        state.check(who, Action.READ, runs[rid].experiment_id)
    va, vb = (load_view(state.store, rid) for rid in ids)
    used = used_records(state.store, ids, state.project.config.providers, state.state_dir)
    d = diff(state.store, va, vb, used=used)
    out: dict[str, Any] = msgspec.to_builtins(d, enc_hook=str)
    return out


@get(f"{API_PREFIX}/ledger", sync_to_thread=True, responses=ERRORS)
def ledger_entries(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    target: Annotated[
        str | None, QueryParameter(schema_extra={"pattern": EXPERIMENT_REF_PATTERN})
    ] = None,
) -> list[LedgerEntry]:
    """Audit ledger entries (``stowplan audit log``) on experiments and runs the caller may
    read; an admin sees them all."""
    state = _state(request)
    if target is not None:
        _ref(target, EXPERIMENT_REF_PATTERN, "a run or experiment id")
    entries = state.store.ledger(target=target)
    return views.visible_ledger(state.store, entries, state.visible(who))


@get(f"{API_PREFIX}/ledger/verify", sync_to_thread=True, responses=ERRORS)
def ledger_verify(request: Request[Any, Any, Any], who: NamedDependency[Principal]) -> Any:
    """Check the whole ledger's hash chain (``stowplan audit verify``). Admins only: the
    chain spans every team's entries."""
    from stowplan.provenance.ledger import verify

    if not allowed(who.role, Action.READ, Scope.OTHER):
        raise PermissionDeniedException(
            f"{who.user} ({who.role} of team {who.team}) may not verify the whole ledger: "
            "it holds every team's entries; ask an admin"
        )
    return verify(_state(request).store.ledger())


@get(f"{API_PREFIX}/quota", sync_to_thread=True, responses=ERRORS)
def quota(request: Request[Any, Any, Any], who: NamedDependency[Principal]) -> list[TeamUse]:
    """Each team's GPUs held, GPU-hours used and runs waiting against its limits
    (``[service.teams]``; ``stowplan quota``): the caller's own team, every team for an
    admin."""
    state = _state(request)
    if state.plane is None:
        raise NotRunningError("this service runs no control plane: no quota is in use")
    out = []
    for team, use in state.sharing(who):
        limits = use["limits"]
        out.append(
            TeamUse(
                team=team,
                holds=use["holds"],
                waiting_gpus=use["waiting_gpus"],
                gpu_hours=round(use["gpu_hours"], 3),
                gpu_hours_limit=limits["gpu_hours"],
                window_s=limits["window_s"],
                guaranteed_gpus=limits["guaranteed_gpus"],
                max_gpus=limits["max_gpus"],
                weight=limits["weight"],
                monthly_usd=limits.get("monthly_usd"),
                spent_usd=round(use.get("spent_usd", 0.0), 2),
                running_usd=round(use.get("running_usd", 0.0), 2),
            )
        )
    return out


# -- errors: a clear 4xx for anything a caller did, never a traceback -------------------------


def _error(status: int, detail: str) -> Response[dict[str, Any]]:
    return Response({"status_code": status, "detail": detail}, status_code=status)


def _on_spec_error(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    text = exc.render() if isinstance(exc, SpecError) else str(exc)
    return _error(400, text)


def _on_conflict(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    return _error(409, str(exc))


def _on_not_running(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    return _error(503, str(exc))


def _on_stowplan(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.error("service: %s", exc)
    return _error(503, str(exc))


def _on_http(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if not isinstance(exc, HTTPException):
        return _error(500, "internal error")
    detail = exc.detail
    if isinstance(exc.__cause__, SerializationException):
        detail = f"the body is not valid JSON (malformed): {detail}"
    extra = exc.extra
    if isinstance(extra, list) and extra:
        # msgspec's message and the field's $.path, a pattern said in words
        parts = []
        for e in extra:
            if not isinstance(e, dict):
                parts.append(str(e))
                continue
            msg = str(e.get("message", ""))
            for pattern, text in PATTERN_TEXT.items():
                if repr(pattern) in msg:
                    msg = text
            key = str(e.get("key") or "")
            parts.append(f"$.{key}: {msg}" if key else msg)
        detail = "invalid request: " + "; ".join(parts)
    resp = _error(exc.status_code, detail)
    for k, v in (exc.headers or {}).items():
        resp.headers[k] = v
    return resp


def _on_internal(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """A bug: the traceback in the service's log, not in the answer."""
    log.error("%s %s: internal error", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal error: the service's log has the details")


def _principal_provider(request: Request[Any, Any, Any]) -> Principal:
    return _principal(request)


def create_app(state: ServiceState, *, debug: bool = False) -> Litestar:
    """The application; ``state`` is kept on ``app.state["service"]``."""
    return Litestar(
        route_handlers=[
            healthz,
            readyz,
            list_experiments,
            experiment_status,
            show_run,
            submit,
            cancel_run,
            cancel_experiment,
            approve_run,
            reject_run,
            plan,
            start_replay,
            replay_status,
            run_logs,
            find_runs,
            run_lineage,
            diff_runs,
            ledger_entries,
            ledger_verify,
            quota,
            metrics.metrics,
            *dashboard.ROUTES,
        ],
        dependencies={"who": Provide(_principal_provider, sync_to_thread=False)},
        before_request=_strict_body,
        plugins=[RequestSchemas()],
        exception_handlers={
            SpecError: _on_spec_error,
            ConflictError: _on_conflict,
            NotRunningError: _on_not_running,
            StowplanError: _on_stowplan,
            HTTPException: _on_http,
            Exception: _on_internal,
        },
        openapi_config=OpenAPIConfig(
            title="stowplan",
            version="1",
            components=Components(
                security_schemes={
                    "token": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description="an API token (`stowplan token create USER`)",
                    )
                }
            ),
            security=[{"token": []}],
        ),
        template_config=dashboard.TEMPLATES,
        middleware=[metrics.MetricsMiddleware],
        on_shutdown=[metrics.on_shutdown],
        request_max_body_size=int(state.config.max_body),  # normalised to bytes
        state=_app_state(state),
        debug=debug,
    )


def _app_state(state: ServiceState) -> Any:
    from litestar.datastructures import State

    return State({"service": state})
