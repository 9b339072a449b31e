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
from stowplan.service.api import (
    PlanRequest,
    PlanResponse,
    ReplayRequest,
    ReplayStatus,
    SubmitRequest,
    SubmitResponse,
)
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


REPLAY_POLL_S = 1.0
"""How often a replay's follower reads its runs' states from the store."""


class Replayer:
    """Replays through the service: ``POST /api/v1/replays`` plans, checks out the recorded
    code, records and submits in the request (so every refusal is its 400); a thread then
    holds the worktree until the replay's runs are final, removes it and computes the
    verdict. Replays are kept in memory by request id: a retried POST answers the first
    replay; after a restart the runs resume in the queue but the verdict is not computed
    (``stowplan replay`` again, or ``stowplan diff``, tells it)."""

    def __init__(self, *, project: Any, people: People, plane: Any | None) -> None:
        self.project = project
        self.people = people
        self.plane = plane
        self._lock = threading.Lock()
        self._replays: dict[str, tuple[str, str, ReplayStatus]] = {}
        """request id -> (user, request body's sha256, status)."""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def status(self, who: Principal, request_id: str, *, everyone: bool) -> ReplayStatus | None:
        with self._lock:
            got = self._replays.get(request_id)
        if got is None or not (everyone or got[0] == who.user):
            return None
        return got[2]

    def start(self, who: Principal, req: ReplayRequest, check: Any) -> tuple[ReplayStatus, bool]:
        """The replay's status, and whether this call started it. ``check(experiment_id)``
        raises unless the caller may read that experiment's runs."""
        body = hashlib.sha256(msgspec.json.encode(req)).hexdigest()
        with self._lock:
            seen = self._replays.get(req.request_id)
            if seen is not None:
                if seen[:2] != (who.user, body):
                    raise ConflictError(
                        f"request id {req.request_id!r} was already used for another request; "
                        "use a new request id for a new replay"
                    )
                return seen[2], False
            status = self._start(who, req, check)
            self._replays[req.request_id] = (who.user, body, status)
            return status, True

    def _start(self, who: Principal, req: ReplayRequest, check: Any) -> ReplayStatus:
        from stowplan.provenance import replay as rp
        from stowplan.session import submissions

        # the caller may read the runs named: checked before anything is said about them
        plan = rp.plan_replay(
            self.project,
            req.targets,
            provider=req.provider,
            strict_env=req.strict_env,
            may_read=check,
        )
        if self.plane is None:
            raise NotRunningError("this service runs no control plane: nothing was replayed")
        plane = self.plane
        held = contextlib.ExitStack()
        try:
            checkout = held.enter_context(rp.checked_out(plan))
            build = rp.build_replay(plan, checkout)
            build.prepared.planned = _owned(build.prepared.planned, who.team, who.user)
            notes = [f"environment differs: {line}" for line in plan.environment_differences]
            notes += [f"note: {line}" for line in build.notes]
            notes += [
                f"note: replay {new_id[:12]} runs unpinned: "
                + (
                    "its original has no recorded placement"
                    if build.pin_supported
                    else "this scheduler cannot pin a hardware class yet"
                )
                for new_id, pin in build.pins.items()
                if pin is None
            ]
            experiment_id = build.prepared.experiment.id
            self.people.add_owner(experiment_id, who.team, who.user)
            with RunStore(Path(plan.store_path)) as store:
                from stowplan.session import record

                record(build.prepared, store)
                _record_replay(store, plan, build, who, req)
            if build.todo:
                plane.submit(submissions(build.prepared, set(build.todo)), plan.upstream)
        except BaseException:
            held.close()
            raise
        status = ReplayStatus(
            request_id=req.request_id,
            experiment_id=experiment_id,
            run_ids=list(build.todo),
            notes=notes,
        )
        t = threading.Thread(
            target=self._follow,
            args=(req, plan, build, held),
            name=f"replay-{req.request_id}",
            daemon=True,
        )
        self._threads.append(t)
        t.start()
        return status

    def _follow(self, req: ReplayRequest, plan: Any, build: Any, held: Any) -> None:
        """Wait until the replay's runs are final, then give the worktree back and verify."""
        from stowplan.provenance import replay as rp
        from stowplan.scheduler.states import FINAL

        outcome: dict[str, Any] | None = None
        error = ""
        try:
            with RunStore(Path(plan.store_path)) as store:
                while not self._stop.is_set():
                    states = store.run_states(build.todo)
                    if all(states.get(i, ("", 0))[0] in FINAL for i in build.todo):
                        break
                    self._stop.wait(REPLAY_POLL_S)
            if self._stop.is_set():
                error = "the service stopped before the replay's runs ended"
            else:
                held.close()  # the runs are over: the worktree goes before the verdict
                done = rp.verify_replay(
                    plan,
                    build,
                    verify=req.verify,
                    tolerance=req.tolerance,
                    tolerances=dict(req.metric_tolerances),
                )
                outcome = msgspec.to_builtins(done)
        except Exception as e:  # the verdict's reader failed: say so, do not die silently
            import logging

            logging.getLogger(__name__).exception("replay %s failed", req.request_id)
            error = f"the replay could not be verified: {e}"
        finally:
            held.close()
        with self._lock:
            user, body, status = self._replays[req.request_id]
            self._replays[req.request_id] = (
                user,
                body,
                msgspec.structs.replace(status, done=True, outcome=outcome, error=error),
            )

    def stop(self) -> None:
        """Stop following replays (the service is stopping); their runs stay queued."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def _record_replay(store: RunStore, plan: Any, build: Any, who: Principal, req: Any) -> None:
    """``provenance.replay.record_replay`` with the caller as the ledger's who.
    NOTE: record_replay takes the process's user; the service acts for the caller."""
    from stowplan.provenance.records import ReplayRecord
    from stowplan.session import run_ids_detail

    experiment = build.prepared.experiment
    store.put_replay_batch(
        [
            ReplayRecord(run_id=new, of_run_id=old, at=build.at)
            for old, new in build.replay_of.items()
        ]
    )
    store.append_ledger(
        who=who.user,
        action="replay",
        target=experiment.id,
        why=req.why,
        details={
            "experiment": experiment.name,
            "of": run_ids_detail(list(build.replay_of)),
            **run_ids_detail(build.todo),
            "commit": build.commit,
            "diff_applied": build.applied_diff,
            "provider": plan.provider,
            "environment_differences": len(plan.environment_differences),
            "team": who.team,
            "request_id": req.request_id,
            "via": "service",
        },
    )
