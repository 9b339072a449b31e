"""A durable local index of attempt keys, for drivers whose requests carry many attempts.

A job array (Slurm), an Indexed Job (Kubernetes) or an array job (AWS Batch) runs many attempts
under one provider-side name (``base.request_name`` of its keys). To report on, cancel or read
the logs of one attempt, a driver needs to know where its key went; to submit idempotently it
needs to know whether a request was tried before. This module keeps both, in one append-only
file (``index.jsonl`` in the driver's state directory):

- key -> ``Member``: the request's name, the attempt's index within it, its declared outputs and
  driver-specific location strings (``where``: Slurm keeps the attempt's directory there);
- request name -> ``RequestRecord``: the provider's job id once known, when it was first tried,
  how many times, and its own location strings (Slurm: the array's directory).

Invariants:

- Write-ahead: ``intend`` is on disk before the driver's submit can reach the provider, so a
  control plane that dies mid-submit knows afterwards which request each key went into.
- A torn last line (a crash mid-append) is skipped on load; the line before it stands. Lines
  are only appended; a later line about the same request or key wins, except that a job id once
  known is never forgotten.
- Find before submit (``submit_once``): a request with a known job id is not submitted again; a
  request that was tried before without a job id coming back (the answer was lost, the control
  plane died) is looked up by name at the provider first, and submitted only if the provider has
  no job of that name. The provider-side name is a function of the keys alone, so "a job of
  that name exists" means "this very request was submitted".
- ``earlier`` names the other requests a key was already tried in (a retry re-planned with
  fewer keys has another name): a driver looks those up before submitting the key again.

The index is driver-agnostic and holds no locks: one driver instance owns one index file, and
callers serialise ``intend``/``submit_once`` per request name (the provider actor runs one
driver; the driver awaits each request's submit in turn).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import msgspec
from msgspec import Struct, field

__all__ = ["KeyIndex", "Member", "RequestRecord", "submit_once"]


class Member(Struct, frozen=True, kw_only=True):
    """Where one attempt went: ``index`` within request ``request``."""

    key: str
    request: str
    index: int
    outputs: list[str] = field(default_factory=list)
    where: dict[str, str] = field(default_factory=dict)
    """driver-specific locations (Slurm: ``attempt_dir``)."""


class RequestRecord(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One request (a job array): its provider job id once known."""

    name: str
    job_id: str | None = None
    tried_at: float = 0.0
    """when it was first tried (epoch seconds): the start of the provider's history to search."""
    tries: int = 0
    """how many times a submit of it started."""
    where: dict[str, str] = field(default_factory=dict)
    """driver-specific locations (Slurm: ``job_dir``)."""


class _Line(Struct, kw_only=True, omit_defaults=True):
    member: Member | None = None
    request: RequestRecord | None = None


_decoder = msgspec.json.Decoder(_Line)
_encoder = msgspec.json.Encoder()


class KeyIndex:
    """The index file at ``path`` (created on the first write), loaded lazily on first use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._loaded = False
        self._members: dict[str, Member] = {}
        self._requests: dict[str, RequestRecord] = {}

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return
        for raw in lines:
            try:
                line = _decoder.decode(raw)
            except msgspec.DecodeError:
                continue  # a torn last line after a crash, or a line of an older format
            self._remember(line)

    def _remember(self, line: _Line) -> None:
        if line.member is not None:
            self._members[line.member.key] = line.member
        if line.request is not None:
            rec = line.request
            known = self._requests.get(rec.name)
            if known is not None and rec.job_id is None and known.job_id is not None:
                rec = msgspec.structs.replace(rec, job_id=known.job_id)
            self._requests[rec.name] = rec

    def _append(self, lines: Sequence[_Line]) -> None:
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(b"".join(_encoder.encode(line) + b"\n" for line in lines))
        for line in lines:
            self._remember(line)

    # -- reading ------------------------------------------------------------------------------

    def member(self, key: str) -> Member | None:
        self._load()
        return self._members.get(key)

    def request(self, name: str) -> RequestRecord | None:
        self._load()
        return self._requests.get(name)

    def earlier(self, name: str, keys: Iterable[str]) -> dict[str, list[str]]:
        """Of ``keys``, those already recorded in a request other than ``name``, by that
        request's name (in first-seen order)."""
        self._load()
        out: dict[str, list[str]] = {}
        for k in keys:
            m = self._members.get(k)
            if m is not None and m.request != name:
                out.setdefault(m.request, []).append(k)
        return out

    # -- writing ------------------------------------------------------------------------------

    def intend(
        self, name: str, members: Sequence[Member], where: dict[str, str] | None = None
    ) -> RequestRecord:
        """Write ahead that request ``name`` with ``members`` is about to be submitted (once
        more). Returns the record as it was BEFORE this call (``tries`` == 0: never tried)."""
        self._load()
        before = self._requests.get(name) or RequestRecord(name=name)
        now = RequestRecord(
            name=name,
            job_id=before.job_id,
            tried_at=before.tried_at or time.time(),
            tries=before.tries + 1,
            where=dict(where) if where is not None else before.where,
        )
        self._append([_Line(member=m) for m in members] + [_Line(request=now)])
        return before

    def submitted(self, name: str, job_id: str) -> None:
        """Record the provider's job id of request ``name``."""
        self._load()
        rec = self._requests.get(name) or RequestRecord(name=name, tried_at=time.time())
        if rec.job_id != job_id:
            self._append([_Line(request=msgspec.structs.replace(rec, job_id=job_id))])

    def learn(self, members: Sequence[Member], requests: Sequence[RequestRecord]) -> None:
        """Record what was found elsewhere (the provider's own records, after a restart)."""
        self._load()
        lines = [_Line(member=m) for m in members if self._members.get(m.key) != m]
        lines += [_Line(request=r) for r in requests if self._requests.get(r.name) != r]
        self._append(lines)


async def submit_once(
    index: KeyIndex,
    before: RequestRecord,
    submit: Callable[[], Awaitable[str]],
    find: Callable[[str], Awaitable[str | None]] | None,
) -> str:
    """The job id of request ``before.name`` (``before``: what ``intend`` returned), submitting
    it only if needed: a known job id is returned as it is; a request tried before is looked up
    with ``find(name)`` first (``find=None``: the driver's ``submit`` looks the name up itself,
    under a lock at the provider); otherwise ``submit()`` runs once. The job id is recorded.
    Errors of ``find`` and ``submit`` escape unchanged: nothing is retried here."""
    name = before.name
    job_id = before.job_id
    if job_id is None and before.tries and find is not None:
        job_id = await find(name)
    if job_id is None:
        job_id = await submit()
    index.submitted(name, job_id)
    return job_id
