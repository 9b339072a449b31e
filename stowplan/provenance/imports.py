"""What a run used of its environment, and whether that is still what a re-run would get.

A run's identity covers the environment as declared (lock files) or, without a declaration,
only the interpreter (implementation and ``major.minor``): not every distribution installed
where stowplan runs, so installing a tool the tasks never import re-runs nothing. What a task
actually used is captured where it runs: the launcher's import hook
(``stowplan/providers/importhook``) writes one line per Python process of the attempt into
``stowplan-used.jsonl``, with the directories on its ``sys.path``. The local driver reads it
when the attempt ends and the queue keeps it with the attempt in the run store
(``AttemptRecord.used``, one row per distinct record), so it outlives the attempt directory;
the file is read only for attempts recorded before that. Before a stored run is
reused, :class:`UsedChecker` looks the distributions it used up again where that interpreter
would find them now: along the recorded path (so a task's own ``PYTHONPATH`` counts), after
checking that the interpreter still runs and is the same ``major.minor`` (this one
in-process, another by one subprocess per interpreter, cached). A changed version, a missing
distribution or a gone interpreter means the stored result was made with something else than
a re-run would use, and the run is not reused.

Theory of operation:

- :func:`read_used` merges the lines of one attempt into a :class:`UsedRecord`: per
  interpreter, the union of the distributions its processes used.
- :meth:`UsedChecker.changes` lists what differs now, one :class:`Change` per distribution;
  :meth:`UsedChecker.now` gives the versions now, which the caller hashes into the re-run's
  identity (``scheduler.plan.EnvPin``), so the re-run is a run of its own and the next
  invocation finds it.
- Nothing here decides what to run; ``session`` does, and says why.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final

import msgspec

from stowplan.provenance.records import AttemptRecord
from stowplan.provenance.store import RunStore
from stowplan.providers.importhook import USED_FILE

__all__ = [
    "USED_FILE",
    "Change",
    "InterpreterUse",
    "UsedChecker",
    "UsedRecord",
    "read_used",
    "summarize",
    "used_differences",
    "used_records",
]

log = logging.getLogger(__name__)

QUERY_TIMEOUT: Final = 60.0

_QUERY = """
import json, sys
print(json.dumps({"python": ".".join(map(str, sys.version_info[:3])), "path": sys.path}))
"""


class InterpreterUse(msgspec.Struct, frozen=True, kw_only=True):
    """What the processes of one interpreter used during an attempt."""

    executable: str
    implementation: str = ""
    python: str = ""
    """``major.minor.micro`` of that interpreter when it ran."""
    distributions: dict[str, str] = msgspec.field(default_factory=dict)
    """normalised distribution name -> version, for every distribution behind an import."""
    path: list[str] = msgspec.field(default_factory=list)
    """the directories on its ``sys.path`` (of all its processes, in order, once each)."""


class UsedRecord(msgspec.Struct, frozen=True, kw_only=True):
    interpreters: list[InterpreterUse]

    def distributions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in self.interpreters:
            out.update(i.distributions)
        return dict(sorted(out.items()))


class Change(msgspec.Struct, frozen=True, kw_only=True):
    """One way what a run used differs from what a re-run would use."""

    name: str
    """a distribution's normalised name, or ``python`` for the interpreter itself."""
    was: str
    now: str | None
    """None: gone (not installed, or the interpreter no longer exists)."""

    def text(self) -> str:
        if self.now is None:
            return f"{self.name} {self.was} is gone"
        return f"{self.name} {self.was} -> {self.now}"


def read_used(path: Path) -> UsedRecord | None:
    """The record in an attempt's ``stowplan-used.jsonl``; None when there is none (no Python
    ran, the hook was turned off, or the attempt ran where this machine cannot read).

    Lines that do not parse (a process killed mid-write) are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    heads: dict[str, tuple[str, str]] = {}
    dists: dict[str, dict[str, str]] = {}
    paths: dict[str, dict[str, None]] = {}
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("executable"), str):
            continue
        exe = rec["executable"]
        heads.setdefault(exe, (str(rec.get("implementation", "")), str(rec.get("python", ""))))
        found = rec.get("distributions")
        if isinstance(found, dict):
            dists.setdefault(exe, {}).update({str(k): str(v) for k, v in found.items()})
        entries = rec.get("path")
        if isinstance(entries, list):
            paths.setdefault(exe, {}).update(dict.fromkeys(str(p) for p in entries))
    if not heads:
        return None
    return UsedRecord(
        interpreters=[
            InterpreterUse(
                executable=exe,
                implementation=impl,
                python=python,
                distributions=dict(sorted(dists.get(exe, {}).items())),
                path=list(paths.get(exe, {})),
            )
            for exe, (impl, python) in sorted(heads.items())
        ]
    )


def used_records(
    store: RunStore,
    run_ids: Sequence[str],
    providers: Mapping[str, object],
    state_dir: Path,
) -> dict[str, UsedRecord]:
    """``run_id -> UsedRecord`` for the succeeded attempt of each run, where one was captured:
    from the store (the provider read it where the attempt ran and the queue recorded it with
    the attempt), else from the attempt directory of a local provider (the launcher's import
    hook writes it there; attempts recorded before the store kept it). Runs without either
    have none."""
    from stowplan.spec.models import LocalProviderConfig

    out: dict[str, UsedRecord] = {}
    stored: list[AttemptRecord] = []
    unstored: list[AttemptRecord] = []
    for attempts in store.attempts_for(list(run_ids)).values():
        done = [a for a in attempts if a.state == "SUCCEEDED"]
        if done:
            (stored if done[-1].used is not None else unstored).append(done[-1])
    records = store.get_used(a.used for a in stored if a.used is not None)
    decoded: dict[str, UsedRecord | None] = {}
    for a in stored:
        h = a.used or ""
        if h not in decoded:
            try:
                decoded[h] = _used_decoder.decode(records[h]) if h in records else None
            except msgspec.DecodeError as e:
                log.warning("import record %s of run %s does not decode: %s", h[:12], a.run_id, e)
                decoded[h] = None
        rec = decoded[h]
        if rec is not None:
            out[a.run_id] = rec
        else:  # not kept after all: the file, if it is still there
            unstored.append(a)
    for a in unstored:
        if not isinstance(providers.get(a.provider), LocalProviderConfig):
            continue
        found = read_used(state_dir / "runs" / a.run_id / str(a.attempt) / USED_FILE)
        if found is not None:
            out[a.run_id] = found
    return out


_used_decoder = msgspec.json.Decoder(UsedRecord)


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


class UsedChecker:
    """Versions now, looked up once per interpreter and path.

    ``this_python`` is the interpreter stowplan runs in: it is asked in-process; another
    interpreter is asked once, by a subprocess, for its version (and, for a record without a
    path, its ``sys.path``). Versions are read from the metadata directories on the path.
    """

    def __init__(self, *, this_python: str | None = None) -> None:
        self.this_python = this_python if this_python is not None else sys.executable
        self._interpreters: dict[str, tuple[str, list[str]] | None] = {}
        self._paths: dict[tuple[str, ...], dict[str, str]] = {}

    def _is_this(self, executable: str) -> bool:
        if executable == self.this_python:
            return True
        try:
            same_dir = Path(executable).parent == Path(self.this_python).parent
            return same_dir and os.path.samefile(executable, self.this_python)
        except OSError:
            return False

    def prefetch(self, records: Iterable[UsedRecord]) -> None:
        """Ask each interpreter of ``records`` once, up front."""
        for rec in records:
            for i in rec.interpreters:
                self._interpreter(i.executable)

    def _interpreter(self, executable: str) -> tuple[str, list[str]] | None:
        """(version, default sys.path) of an interpreter now; None when it cannot run."""
        if executable not in self._interpreters:
            if self._is_this(executable):
                v = sys.version_info
                found: tuple[str, list[str]] | None = (
                    f"{v.major}.{v.minor}.{v.micro}",
                    list(sys.path),
                )
            else:
                found = self._ask(executable)
            self._interpreters[executable] = found
        return self._interpreters[executable]

    def _versions(self, path: Sequence[str]) -> dict[str, str]:
        key = tuple(path)
        if key not in self._paths:
            from stowplan.provenance.capture import distributions_on

            self._paths[key] = distributions_on(path)
        return self._paths[key]

    def _query(self, use: InterpreterUse) -> tuple[str | None, dict[str, str]]:
        found = self._interpreter(use.executable)
        if found is None:
            return None, {}
        python, default_path = found
        return python, self._versions(use.path or default_path)

    def _ask(self, executable: str) -> tuple[str, list[str]] | None:
        if not os.access(executable, os.X_OK):
            return None
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOWPLAN_")}
        try:
            done = subprocess.run(
                [executable, "-c", _QUERY],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=QUERY_TIMEOUT,
                cwd="/",
                env=env,
                check=False,
            )
            data = json.loads(done.stdout.decode("utf-8", errors="replace") or "null")
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            log.warning("cannot ask %s for its version: %s", executable, e)
            return None
        if done.returncode != 0 or not isinstance(data, dict):
            log.warning(
                "cannot ask %s for its version: %s",
                executable,
                done.stderr.decode(errors="replace").strip()[-300:],
            )
            return None
        return str(data.get("python") or ""), [str(p) for p in data.get("path") or []]

    def changes(self, rec: UsedRecord) -> list[Change]:
        """How what ``rec`` used differs from what its interpreters have now; [] if not at all."""
        out: list[Change] = []
        for i in rec.interpreters:
            python, versions = self._query(i)
            if python is None:
                out.append(Change(name=f"python {i.executable}", was=i.python, now=None))
                continue
            if i.python and _minor(python) != _minor(i.python):
                out.append(Change(name="python", was=i.python, now=python))
            for name, was in sorted(i.distributions.items()):
                now = versions.get(name)
                if now != was:
                    out.append(Change(name=name, was=was, now=now))
        return out

    def now(self, rec: UsedRecord) -> dict[str, str]:
        """The versions now of what ``rec`` used (``name`` -> version, ``-`` for gone), keyed
        by interpreter when there are several: what a re-run's identity is pinned to."""
        out: dict[str, str] = {}
        many = len(rec.interpreters) > 1
        for i in rec.interpreters:
            python, versions = self._query(i)
            prefix = f"{i.executable}:" if many else ""
            out[f"{prefix}python"] = _minor(python) if python else "-"
            for name in i.distributions:
                out[prefix + name] = versions.get(name, "-")
        return dict(sorted(out.items()))


def summarize(changes: Sequence[Change], limit: int = 3) -> str:
    """``numpy 1.26.4 -> 2.0.0, scipy 1.13.0 -> 1.14.0 and 2 more``."""
    texts = [c.text() for c in changes]
    if len(texts) <= limit:
        return ", ".join(texts)
    return ", ".join(texts[:limit]) + f" and {len(texts) - limit} more"


def used_differences(
    recorded: UsedRecord | None, now: Mapping[str, str] | Sequence[str]
) -> list[str]:
    """How the distributions a run used differ from ``now`` (``name==version`` lines, as
    ``capture_environment`` lists them, or a name -> version mapping): one line each."""
    if recorded is None:
        return []
    if isinstance(now, Mapping):
        have = dict(now)
    else:
        have = {d.partition("==")[0]: d.partition("==")[2] for d in now}
    out: list[str] = []
    for name, was in recorded.distributions().items():
        got = have.get(name)
        if got is None:
            out.append(f"used package missing: {name}=={was}")
        elif got != was:
            out.append(f"used package changed: {name} {was} -> {got}")
    return out
