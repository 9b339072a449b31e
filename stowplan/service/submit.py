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
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import msgspec

from stowplan.errors import SpecError
from stowplan.provenance.store import RunStore
from stowplan.service.api import PlanRequest, PlanResponse, SubmitRequest, SubmitResponse
from stowplan.service.auth import Principal
from stowplan.service.people import People, SubmissionRecord

WORKSPACES = "workspaces"
PLANS_AT_ONCE = 2
PLAN_TIMEOUT_S = 300.0


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
        self._plans = threading.Semaphore(PLANS_AT_ONCE)

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

    def plan(self, who: Principal, req: PlanRequest) -> PlanResponse:
        """``stowplan plan`` of the experiment, run as its own process in a scratch
        workspace (as the lab's project sees it), which is removed again: nothing is
        recorded. At most ``PLANS_AT_ONCE`` run at a time; each gets ``PLAN_TIMEOUT_S``."""
        import subprocess
        import sys
        import uuid

        ws = self._workspace(who, f"plan-{uuid.uuid4().hex}")
        try:
            path = self._write(ws, req)
            argv = [sys.executable, "-m", "stowplan.cli.main", "plan", path.name]
            if req.provider is not None:
                argv += ["--provider", req.provider]
            if req.explain is not None:
                argv += ["--explain", req.explain]
            if req.budget is not None:
                argv += ["--budget", repr(req.budget)]
            if req.json:
                argv.append("--json")
            env = {k: v for k, v in os.environ.items() if not k.startswith("STOWPLAN_")}
            with self._plans:
                try:
                    done = subprocess.run(
                        argv, cwd=ws, env=env, capture_output=True, timeout=PLAN_TIMEOUT_S
                    )
                except subprocess.TimeoutExpired:
                    raise NotRunningError(
                        f"the plan took longer than {PLAN_TIMEOUT_S:g} s and was stopped"
                    ) from None
            out = done.stdout.decode(errors="replace")
            err = done.stderr.decode(errors="replace")
            return PlanResponse(
                exit_code=done.returncode,
                output=_hide(out, ws),
                errors=_hide(err, ws),
            )
        finally:
            self._remove(ws)

    def _remove(self, ws: Path) -> None:
        shutil.rmtree(ws, ignore_errors=True)
        base = self.root / WORKSPACES
        for d in (ws.parent, ws.parent.parent, base):  # the user's, the team's, all
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty

    def _workspace(self, who: Principal, name: str) -> Path:
        base = (self.root / WORKSPACES).resolve()
        ws = (base / who.team / who.user / name).resolve()
        if not ws.is_relative_to(base):  # the patterns forbid it; this says so twice
            raise SpecError("the request id leaves the workspace", path="$.request_id")
        return ws

    def _write(self, ws: Path, req: SubmitRequest | PlanRequest) -> Path:
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
        from stowplan.placement.context import context_for
        from stowplan.session import (
            check_feasible,
            discover,
            prepare,
            record,
            record_submission,
            save_discovered,
            submissions,
        )

        ws = self._workspace(who, req.request_id)
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
            prepared.planned = _owned(prepared.planned, who.team, who.user)
            save_discovered(prepared, pools)
            ids = [r.run_id for r in prepared.planned]
            self.people.add_owner(prepared.experiment.id, who.team, who.user)
            with RunStore(Path(prepared.store_path)) as store:
                existing = store.get_runs(ids)
                reused = [i for i in ids if i in existing and existing[i].state == "SUCCEEDED"]
                todo = [i for i in ids if i not in set(reused)]
                record(prepared, store)
                written = True
                record_submission(
                    prepared,
                    store,
                    todo,
                    seen_before=list(existing),
                    why=req.why,
                    provider=req.provider,
                    who=who.user,
                    # the file as sent, not the workspace's path on the server
                    details={
                        "file": req.filename,
                        "team": who.team,
                        "request_id": req.request_id,
                        "via": "service",
                    },
                )
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
                run_ids=ids,
            )
        finally:
            if not written:
                self._remove(ws)


def _owned(planned: list[Any], team: str, user: str) -> list[Any]:
    """``planned`` with each run's team and user set: its GPUs count against the team's
    limits and its usage orders fair share (``scheduler.share``)."""
    return [
        msgspec.structs.replace(
            r, instance=msgspec.structs.replace(r.instance, team=team, user=user)
        )
        for r in planned
    ]


def _hide(text: str, ws: Path) -> str:
    """``text`` without the server's workspace path."""
    return text.replace(str(ws) + "/", "").replace(str(ws), ".")


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
