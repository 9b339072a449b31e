"""The store actor: the single writer of a project's run store.

A synchronous actor with one thread, so calls from one caller run in the order they were made:
the queue actor's writes are never reordered. Batches arrive as msgpack bytes (see ``wire``),
bulk rows as arrays (``provenance.store.runs``: ``Step``, ``AttemptRow``, ``IntentRow``).

The queue writes two things (module doc of ``queue``): a submit's write-ahead record
(``write_dispatch``: its intents and the solve that placed them, durable before the provider
hears of an attempt) and, each tick, provider answers with the steps of their runs and the
steps that must not wait (``update_attempts``), each one transaction. It holds the steps that
may wait itself, so a run's steps to its submit usually reach this actor with its end: one
events row and one runs update per trial. A restarted queue reads back a run whose steps were
not written as SUBMITTING the attempt of its intent (``load_active``).

``apply_transitions`` (for other writers) may still hold a batch whose every step ends in
:data:`HELD_STATES` (READY and PLACED) in memory, for at most :data:`HOLD_S`, and write it with
the next batch in the same transaction. Every read, intent, ``ping`` (so ``drain``) and the
timer write the held steps first. A crash loses only held steps, and a restart starts a run
in READY or PLACED over from PENDING anyway, so nothing it needs is lost.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from stowplan.actors.runtime import note_worker
from stowplan.actors.wire import pack, tune_gc, unpack
from stowplan.placement.context import datasets_in_spec
from stowplan.placement.leases import DeviceLease, lease_from_columns
from stowplan.placement.problem import Dataset
from stowplan.provenance.records import (
    ArtifactRecord,
    AttemptRecord,
    ExperimentRecord,
    PlacementRecord,
    RunRecord,
    TransitionRecord,
)
from stowplan.provenance.store import ArtifactsNotStored, RunStore
from stowplan.provenance.store.runs import Dispatch, StepBatch

log = logging.getLogger(__name__)

HELD_STATES: Final = frozenset({"READY", "PLACED"})
"""States a transition batch may be held in memory for (see the module docstring)."""
HOLD_S: Final = 5.0
"""Most seconds a held step waits (here, or in the queue) before it is written."""


def lease_of(a: AttemptRecord) -> DeviceLease | None:
    """The node and devices a stored attempt holds, for a restarted core to give back to its
    pool's ledger (``RestoredTask.lease``); None where they were not recorded (a pool that
    does not know its devices, a store older than schema 8)."""
    return lease_from_columns(a.node, a.devices)


class StoreActor:
    def __init__(
        self,
        path: str,
        *,
        state_dir: str | None = None,
        owner: tuple[int, float] | None = None,
        hold_s: float = HOLD_S,
    ) -> None:
        note_worker(state_dir, "store", owner)
        tune_gc()
        self.store = RunStore(path)
        self._hold_s = hold_s
        self._lock = threading.Lock()
        self._held: list[TransitionRecord] = []
        self._timer: threading.Timer | None = None
        self._held_error: Exception | None = None

    def ping(self) -> bool:
        self._write_held()
        return True

    def put_experiment(self, rec: bytes) -> None:
        self.store.put_experiment(unpack(rec, ExperimentRecord))

    def put_runs(self, recs: bytes) -> None:
        self.store.put_runs(unpack(recs, list[RunRecord]))

    def get_runs(self, run_ids: list[str]) -> bytes:
        self._write_held()
        return pack(self.store.get_runs(run_ids))

    def apply_transitions(self, ts: bytes) -> None:
        """Write a batch of transitions, or hold it (see the module docstring); a held batch
        that failed to be written fails this call (and the batch is written no more)."""
        batch: list[TransitionRecord] = unpack(ts, list[TransitionRecord])
        with self._lock:
            self._raise_held_error()
            if self._hold_s > 0 and all(t.to_state in HELD_STATES for t in batch):
                if batch and not self._held:
                    self._timer = threading.Timer(self._hold_s, self._write_held_later)
                    self._timer.daemon = True
                    self._timer.start()
                self._held.extend(batch)
                return
            held, self._held = self._held, []
            self._stop_timer()
            self.store.apply_transitions([*held, *batch] if held else batch)

    def _write_held(self) -> None:
        with self._lock:
            self._raise_held_error()
            held, self._held = self._held, []
            self._stop_timer()
            self.store.apply_transitions(held)

    def _write_held_later(self) -> None:
        with self._lock:
            held, self._held = self._held, []
            self._timer = None
            try:
                self.store.apply_transitions(held)
            except Exception as e:  # raised by the next call, to the queue that sent them
                log.exception("held transitions could not be written")
                self._held_error = e

    def _raise_held_error(self) -> None:
        if self._held_error is not None:
            e, self._held_error = self._held_error, None
            raise e

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def write_intents(self, intents: bytes) -> None:
        # after the transitions that led to them, held ones included
        self._write_held()
        self.store.write_intents(unpack(intents, list[AttemptRecord]))

    def write_dispatch(self, dispatch: bytes) -> None:
        """A submit's write-ahead record (``Dispatch``: steps, solves, intents, and the
        provider answers that came before), in one transaction, after any held steps."""
        self._write_held()
        self.store.write_dispatch(unpack(dispatch, Dispatch))

    def update_attempts(self, batch: bytes) -> None:
        """Provider answers, then the steps of their runs and any others the queue sends
        (``StepBatch``), in one transaction, after any held steps; never held itself (the
        queue holds what may wait)."""
        self._write_held()
        self.store.write_steps(unpack(batch, StepBatch))

    def put_used(self, records: list[bytes]) -> None:
        """Keep import records (what ``AttemptRecord.used`` names); sent before the updates."""
        self.store.put_used(records)

    def put_blob(self, data: bytes) -> str:
        return self.store.put_blob(data)

    def put_placements(self, recs: bytes) -> None:
        self.store.put_placements(unpack(recs, list[PlacementRecord]))

    def store_outputs(self, outputs: dict[str, dict[str, str]]) -> dict[str, str]:
        """Store the outputs of each run as far as they can be; run id -> why it was not
        wholly stored, for each run that was not (the queue fails its attempt: a run never
        succeeds without all its outputs). Never raises for one run's outputs.

        ``outputs`` is run id -> output name -> where the output is: a local path, or an
        fsspec URL where a remote driver left it (``RunStore.put_artifacts`` says how each is
        read, a directory output's ``.tar.gz`` included)."""
        failed: dict[str, str] = {}
        for run_id, files in outputs.items():
            try:
                self.store.put_artifacts(run_id, files)
            except ArtifactsNotStored as e:
                failed[run_id] = str(e)
            except Exception as e:  # one run's failure must not keep the others unstored
                failed[run_id] = f"run {run_id[:12]}: outputs not stored: {type(e).__name__}: {e}"
        return failed

    def artifacts_for(self, run_ids: list[str]) -> bytes:
        return pack(self.store.artifacts_for(run_ids))

    def load_active(self) -> bytes:
        """Active runs, their attempts, and which of their dependencies already succeeded.

        A run with an intent beyond its recorded attempts was submitted (or about to be)
        before the steps that led there were written (the queue writes only the intent
        ahead of a submit): it is given as SUBMITTING that attempt, to be reconciled by its
        key, never submitted afresh."""
        self._write_held()
        runs = self.store.active_runs()
        attempts = self.store.attempts_for([r.run_id for r in runs])
        for i, r in enumerate(runs):
            latest = max((a.attempt for a in attempts.get(r.run_id, ())), default=0)
            if latest > r.attempts:
                runs[i] = msgspec.structs.replace(r, state="SUBMITTING", attempts=latest)
        deps = sorted({d for r in runs for d in r.depends_on})
        done = [rid for rid, rec in self.store.get_runs(deps).items() if rec.state == "SUCCEEDED"]
        return pack((runs, attempts, done))

    def states(self, run_ids: list[str]) -> dict[str, str]:
        self._write_held()
        return {rid: st for rid, (st, _) in self.store.run_states(run_ids).items()}

    def attempts_so_far(self, run_ids: list[str]) -> dict[str, tuple[str, int]]:
        """(state, attempts) of each stored run that already had an attempt."""
        self._write_held()
        return {
            rid: (state, attempts)
            for rid, (state, attempts) in self.store.run_states(run_ids).items()
            if attempts > 0 or state == "SUCCEEDED"
        }

    def record_costs(self, provider: str, keys: list[str], rates: bytes) -> int:
        """Bill ``provider``'s attempts ``keys`` that ended (with the others of their
        instances) at ``rates``, the rate of each of its priced elastic pools by id
        (``prices.pool_rate``); returns how many attempts' costs were written."""
        from stowplan.providers.aws.prices import Rate, record_costs

        return record_costs(self.store, provider, unpack(rates, dict[str, Rate]), keys)

    def budget_of(self, run_ids: list[str]) -> bytes:
        """The newest experiment among ``run_ids``' and its effective ``[policy] budget``:
        ``(experiment id, SpendBudget | None)``, ``(None, None)`` when none is stored."""
        return pack(self._budget(self.store.experiment_ids(run_ids)))

    def submitted(self, run_ids: list[str]) -> bytes:
        """What a submission of ``run_ids`` needs, in one read: ``attempts_so_far`` and
        ``budget_of`` together, ``(so far, experiment id, SpendBudget | None)``."""
        self._write_held()
        so_far, experiments = self.store.submission_states(run_ids)
        return pack((so_far, *self._budget(experiments)))

    def _budget(self, experiment_ids: list[str]) -> tuple[str | None, Any]:
        from stowplan.spec.models import SpendBudget

        exps = [self.store.get_experiment(e) for e in experiment_ids]
        known = [e for e in exps if e is not None]
        if not known:
            return None, None
        exp = max(known, key=lambda e: (e.created_at, e.id))
        raw = (exp.spec.get("effective_policy") or {}).get("budget")
        budget = None if raw is None else msgspec.convert(raw, SpendBudget)
        return exp.id, budget

    def datasets_of(self, run_ids: list[str]) -> bytes:
        """The inputs (``list[placement.problem.Dataset]``) that the experiments of
        ``run_ids`` declare, as ``placement.context.context_for`` makes them: what a
        long-lived queue needs to place runs of experiments it did not start with."""
        found: dict[str, Dataset] = {}
        for eid in self.store.experiment_ids(run_ids):
            exp = self.store.get_experiment(eid)
            if exp is not None:
                for d in datasets_in_spec(exp.spec):
                    found.setdefault(d.id, d)
        return pack([found[k] for k in sorted(found)])

    def approved(self, run_ids: list[str]) -> list[str]:
        """Those of ``run_ids`` someone approved (the ledger), for a restarted queue."""
        return self.store.approved(run_ids)

    def spending(self, experiment_id: str | None, now: float) -> tuple[float, float]:
        """Dollars recorded this calendar month (UTC, of ``now``) and by ``experiment_id``."""
        month = self.store.cost_since(month_start(now))
        if experiment_id is None:
            return month, 0.0
        return month, self.store.cost_by_experiment([experiment_id]).get(experiment_id, 0.0)

    def active_keys(self, provider: str) -> list[str]:
        self._write_held()
        return [a.key for a in self.store.active_attempts() if a.provider == provider]


def month_start(now: float) -> float:
    """The first instant of ``now``'s calendar month, in UTC (the monthly budget's month)."""
    d = datetime.fromtimestamp(now, UTC)
    return datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()


ActiveState = tuple[list[RunRecord], dict[str, list[AttemptRecord]], list[str]]
Artifacts = dict[str, list[ArtifactRecord]]
