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

import logging
import re
from pathlib import Path
from typing import Any

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
from litestar.params import FromPath, RequestBody
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from stowplan.errors import SpecError, StowplanError
from stowplan.provenance.store import RunStore
from stowplan.scheduler.states import FINAL
from stowplan.service import views
from stowplan.service.api import (
    API_PREFIX,
    EXPERIMENT_REF_PATTERN,
    PATTERN_TEXT,
    RUN_REF_PATTERN,
    CancelRequest,
    CancelResponse,
    Health,
    SubmitRequest,
    SubmitResponse,
)
from stowplan.service.auth import Action, Principal, Scope, allowed, principal_of, scope_of
from stowplan.service.people import People
from stowplan.service.submit import ConflictError, NotRunningError, Submitter
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
    ) -> None:
        self.project = project
        self.config = project.config.service
        self.state_dir = state_dir
        self.store = store
        self.people = people
        self.plane = plane
        self.submitter = Submitter(root=Path(project.root), people=people, plane=plane)

    def visible(self, who: Principal) -> views.Visible:
        if allowed(who.role, Action.READ, Scope.OTHER):
            return None
        mine = self.people.experiments_of({who.team})
        return mine.__contains__

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


def _resolve_run(state: ServiceState, ref: str) -> str:
    try:
        return state.store.resolve_run(_ref(ref, RUN_REF_PATTERN, "a run id"))
    except KeyError:
        raise NotFoundException(f"no run {ref!r}") from None
    except ValueError as e:
        raise ValidationException(str(e.args[0] if e.args else e)) from None


# -- endpoints ------------------------------------------------------------------------------


@get("/healthz", sync_to_thread=False)
def healthz() -> Health:
    """The process answers."""
    return Health(ok=True)


@get("/readyz", sync_to_thread=True)
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


@get(f"{API_PREFIX}/experiments", sync_to_thread=True)
def list_experiments(
    request: Request[Any, Any, Any], who: NamedDependency[Principal]
) -> list[views.ExperimentSummary]:
    """The experiments the caller may read, newest first (``stowplan ls``)."""
    state = _state(request)
    return views.list_experiments(state.store, visible=state.visible(who))


@get(f"{API_PREFIX}/experiments/{{ref:str}}/status", sync_to_thread=True)
def experiment_status(
    request: Request[Any, Any, Any], who: NamedDependency[Principal], ref: FromPath[str]
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


@get(f"{API_PREFIX}/runs/{{ref:str}}", sync_to_thread=True)
def show_run(
    request: Request[Any, Any, Any], who: NamedDependency[Principal], ref: FromPath[str]
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


@post(f"{API_PREFIX}/experiments", sync_to_thread=True)
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
    answer, created = state.submitter.submit(who, data)
    return Response(answer, status_code=HTTP_201_CREATED if created else HTTP_200_OK)


@post(f"{API_PREFIX}/runs/{{ref:str}}/cancel", sync_to_thread=True, status_code=HTTP_200_OK)
def cancel_run(
    request: Request[Any, Any, Any],
    who: NamedDependency[Principal],
    ref: FromPath[str],
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
        ],
        dependencies={"who": Provide(_principal_provider, sync_to_thread=False)},
        exception_handlers={
            SpecError: _on_spec_error,
            ConflictError: _on_conflict,
            NotRunningError: _on_not_running,
            StowplanError: _on_stowplan,
            HTTPException: _on_http,
        },
        openapi_config=OpenAPIConfig(title="stowplan", version="1"),
        request_max_body_size=int(state.config.max_body),  # normalised to bytes
        state=_app_state(state),
        debug=debug,
    )


def _app_state(state: ServiceState) -> Any:
    from litestar.datastructures import State

    return State({"service": state})
