"""A submission through the service: the same session steps as ``stowplan run`` (prepare,
feasibility, record, ledger, hand to the queue), on the service's long-lived control plane.

The experiment file and the files it names are written to a workspace under the service's
project (``<root>/workspaces/<team>/<user>/<request id>/``), so the session finds the lab's
``stowplan.toml`` above it: the lab's providers, store and policy defaults. A submission that
fails before anything is recorded leaves no workspace and no row behind.

Submissions are serialised by one lock: the check for an earlier answer to the same request
id, and the answer's record, are one step, so a retried POST never creates a second
experiment even while the first is still being prepared.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import threading
from pathlib import Path
from typing import Any

import msgspec

from stowplan.errors import SpecError
from stowplan.provenance.store import RunStore
from stowplan.service.api import SubmitRequest, SubmitResponse
from stowplan.service.auth import Principal
from stowplan.service.people import People, SubmissionRecord

WORKSPACES = "workspaces"


class ConflictError(Exception):
    """The request id was used before for a different submission."""


class NotRunningError(Exception):
    """No control plane runs in this service."""


class Submitter:
    def __init__(self, *, root: Path, people: People, plane: Any | None) -> None:
        self.root = root
        self.people = people
        self.plane = plane
        self._lock = threading.Lock()

    def submit(self, who: Principal, req: SubmitRequest) -> tuple[SubmitResponse, bool]:
        """The answer, and whether this call created it (False: an earlier answer)."""
        body = hashlib.sha256(msgspec.json.encode(req)).hexdigest()
        with self._lock:
            seen = self.people.find_submission(who.user, req.request_id)
            if seen is not None:
                if seen.body_sha256 != body:
                    raise ConflictError(
                        f"request id {req.request_id!r} was already used for another "
                        "submission; use a new request id for a new submission"
                    )
                return msgspec.json.decode(seen.response, type=SubmitResponse), False
            answer = self._submit(who, req)
            self.people.put_submission(
                SubmissionRecord(
                    user=who.user,
                    request_id=req.request_id,
                    body_sha256=body,
                    experiment_id=answer.experiment_id,
                    response=msgspec.json.encode(answer),
                )
            )
            return answer, True

    def _workspace(self, who: Principal, req: SubmitRequest) -> Path:
        base = (self.root / WORKSPACES).resolve()
        ws = (base / who.team / who.user / req.request_id).resolve()
        if not ws.is_relative_to(base):  # the patterns forbid it; this says so twice
            raise SpecError("the request id leaves the workspace", path="$.request_id")
        return ws

    def _write(self, ws: Path, req: SubmitRequest) -> Path:
        if ws.exists():
            shutil.rmtree(ws)  # what a failed earlier try of this request id left
        ws.mkdir(parents=True)
        for rel, data in sorted(req.files.items()):
            target = (ws / rel).resolve()
            if not target.is_relative_to(ws) or rel == req.filename:
                raise SpecError(
                    f"file {rel!r} is outside the workspace or replaces the experiment file",
                    path=f"$.files.{rel}",
                    hint="name files by relative paths beside the experiment file",
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        exp = ws / req.filename
        exp.write_text(req.experiment, encoding="utf-8")
        return exp

    def _submit(self, who: Principal, req: SubmitRequest) -> SubmitResponse:
        from stowplan.cli.control import discover, save_discovered
        from stowplan.placement.context import context_for
        from stowplan.session import check_feasible, prepare, record, submissions

        ws = self._workspace(who, req)
        written = False
        try:
            path = self._write(ws, req)
            try:
                prepared = prepare(path, provider=req.provider)
                context_for(prepared.project, prepared.loaded)
                pools = discover(prepared)
                check_feasible(prepared, pools)
            except SpecError as e:
                raise _relative(e, ws) from None
            if self.plane is None:
                raise NotRunningError("this service runs no control plane: nothing was submitted")
            plane = self.plane
            prepared.planned = _known_datasets(prepared.planned, plane.context)
            save_discovered(prepared, pools)
            ids = [r.run_id for r in prepared.planned]
            self.people.add_owner(prepared.experiment.id, who.team, who.user)
            with RunStore(Path(prepared.store_path)) as store:
                existing = store.get_runs(ids)
                reused = [i for i in ids if i in existing and existing[i].state == "SUCCEEDED"]
                todo = [i for i in ids if i not in set(reused)]
                record(prepared, store)
                written = True
                _ledger(store, prepared, who, req, todo, seen_before=set(existing))
            if todo:
                plane.submit(submissions(prepared, set(todo)), reused)
            return SubmitResponse(
                request_id=req.request_id,
                experiment_id=prepared.experiment.id,
                name=prepared.experiment.name,
                runs=len(ids),
                submitted=len(todo),
                reused=len(reused),
                notes=prepared.notes,
            )
        finally:
            if not written:
                shutil.rmtree(ws, ignore_errors=True)
                base = self.root / WORKSPACES
                for d in (ws.parent, ws.parent.parent, base):  # the user's, the team's, all
                    with contextlib.suppress(OSError):
                        d.rmdir()  # only when empty


def _known_datasets(planned: list[Any], context: Any) -> list[Any]:
    """``planned`` with each run's datasets narrowed to those the control plane's placement
    context declares.

    NOTE: a queue's context (the network, residency rules, datasets) is fixed when it
    starts, and a long-lived one starts before any experiment: a run naming a dataset the
    context lacks would be an invalid placement problem and wait forever. Until the core
    takes datasets with a submission, service runs are placed without their input data's
    sizes and sites (its identity, versions and provenance are unchanged)."""
    known = {d.id for d in context.datasets}
    out = []
    for r in planned:
        keep = tuple(d for d in r.instance.datasets if d in known)
        if keep != tuple(r.instance.datasets):
            inst = msgspec.structs.replace(r.instance, datasets=keep)
            r = msgspec.structs.replace(r, instance=inst)
        out.append(r)
    return out


def _relative(e: SpecError, ws: Path) -> SpecError:
    """The error with the server's workspace path left out of the file name."""
    file = e.file
    if file is not None:
        try:
            file = str(Path(file).resolve().relative_to(ws))
        except ValueError:
            file = Path(file).name
    msg = e.message.replace(str(ws) + "/", "").replace(str(ws), ".")
    hint = e.hint.replace(str(ws) + "/", "") if e.hint else e.hint
    return SpecError(msg, file=file, path=e.path, line=e.line, hint=hint)


def _ledger(
    store: RunStore,
    prepared: Any,
    who: Principal,
    req: SubmitRequest,
    todo: list[str],
    *,
    seen_before: set[str],
) -> None:
    """``submit`` and ``retry`` entries as ``session.record_submission`` writes them, naming
    the service's user (and team and request id) instead of the OS user running it."""
    from stowplan.session import run_ids_detail

    exp = prepared.experiment
    base = {
        "experiment": exp.name,
        "file": req.filename,
        "replicate": prepared.replicate,
        "replicates": prepared.replicates,
        "provider": req.provider,
        "team": who.team,
        "request_id": req.request_id,
        "via": "service",
    }
    fresh = [r for r in todo if r not in seen_before]
    again = [r for r in todo if r in seen_before]
    for action, ids in (("submit", fresh), ("retry", again)):
        if ids:
            store.append_ledger(
                who=who.user,
                action="submit" if action == "submit" else "retry",
                target=exp.id,
                why=req.why,
                details={**base, **run_ids_detail(ids)},
            )
