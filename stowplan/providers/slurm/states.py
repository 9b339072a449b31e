"""Slurm job states -> our provider states and failure classes, through one total function.

The table lists every base state Slurm 22.05 documents (``squeue``/``sacct`` long names);
anything else, including states of later versions, maps to ``UNKNOWN``.
"""

from __future__ import annotations

import re

from stowplan.scheduler.reports import ProviderState
from stowplan.spec.models import FailureClass

SLURM_STATES: dict[str, tuple[ProviderState, FailureClass | None]] = {
    "PENDING": (ProviderState.QUEUED, None),
    "CONFIGURING": (ProviderState.QUEUED, None),
    "REQUEUED": (ProviderState.QUEUED, None),
    "REQUEUE_FED": (ProviderState.QUEUED, None),
    "REQUEUE_HOLD": (ProviderState.QUEUED, None),
    "RESV_DEL_HOLD": (ProviderState.QUEUED, None),
    "RESIZING": (ProviderState.RUNNING, None),
    "RUNNING": (ProviderState.RUNNING, None),
    "COMPLETING": (ProviderState.RUNNING, None),
    "STAGE_OUT": (ProviderState.RUNNING, None),
    "SIGNALING": (ProviderState.RUNNING, None),
    "SUSPENDED": (ProviderState.RUNNING, None),
    "STOPPED": (ProviderState.RUNNING, None),
    "COMPLETED": (ProviderState.SUCCEEDED, None),
    "FAILED": (ProviderState.FAILED, FailureClass.USER_ERROR),
    "SPECIAL_EXIT": (ProviderState.FAILED, FailureClass.USER_ERROR),
    "OUT_OF_MEMORY": (ProviderState.FAILED, FailureClass.OUT_OF_MEMORY),
    "TIMEOUT": (ProviderState.FAILED, FailureClass.TIMEOUT),
    "DEADLINE": (ProviderState.FAILED, FailureClass.TIMEOUT),
    "PREEMPTED": (ProviderState.FAILED, FailureClass.PREEMPTED),
    "NODE_FAIL": (ProviderState.FAILED, FailureClass.NODE_FAILURE),
    "BOOT_FAIL": (ProviderState.FAILED, FailureClass.NODE_FAILURE),
    "LAUNCH_FAILED": (ProviderState.FAILED, FailureClass.NODE_FAILURE),
    "CANCELLED": (ProviderState.CANCELLED, None),
    "REVOKED": (ProviderState.CANCELLED, None),
}

_SHORT = {
    "PD": "PENDING",
    "CF": "CONFIGURING",
    "RQ": "REQUEUED",
    "RF": "REQUEUE_FED",
    "RH": "REQUEUE_HOLD",
    "RD": "RESV_DEL_HOLD",
    "RS": "RESIZING",
    "R": "RUNNING",
    "CG": "COMPLETING",
    "SO": "STAGE_OUT",
    "SI": "SIGNALING",
    "S": "SUSPENDED",
    "ST": "STOPPED",
    "CD": "COMPLETED",
    "F": "FAILED",
    "SE": "SPECIAL_EXIT",
    "OOM": "OUT_OF_MEMORY",
    "TO": "TIMEOUT",
    "DL": "DEADLINE",
    "PR": "PREEMPTED",
    "NF": "NODE_FAIL",
    "BF": "BOOT_FAIL",
    "LF": "LAUNCH_FAILED",
    "CA": "CANCELLED",
    "RV": "REVOKED",
}


def normalize_state(raw: str) -> str:
    """``"CANCELLED by 0"``, ``"COMPLETING+"``, ``"cd"`` -> the table's long name (or as is)."""
    word = raw.strip().split(" ", 1)[0].rstrip("+*").upper()
    return _SHORT.get(word, word)


def slurm_state(
    raw: str, exit_code: int | None = None
) -> tuple[ProviderState, FailureClass | None]:
    """Our state and failure class for a Slurm state. Total: unknown states give ``UNKNOWN``.

    A ``COMPLETED`` job with a non-zero exit code (possible when the batch script traps it)
    is a user error.
    """
    state, failure = SLURM_STATES.get(normalize_state(raw), (ProviderState.UNKNOWN, None))
    if state is ProviderState.SUCCEEDED and exit_code not in (None, 0):
        return ProviderState.FAILED, FailureClass.USER_ERROR
    return state, failure


CAPACITY_STATES = frozenset({"NODE_FAIL", "BOOT_FAIL"})
"""Final states that say a node was lost under the job."""
_CAPACITY_REASON = re.compile(
    r"NodeDown|ReqNodeNotAvail|PartitionDown|PartitionInactive|\bdown\b|\bdrain(?:ed|ing)?\b",
    re.IGNORECASE,
)
"""Pending or final reasons (``squeue %r``) that name nodes or partitions gone out of service."""


def capacity_reason(state: str, reason: str, node: str | None = None) -> str | None:
    """Why the cluster's capacity changed, if a job's state and reason say it did (a node
    failed under it, or it waits for nodes that went down or were drained); else ``None``.
    The text names no job, so many jobs telling the same news give the same reason."""
    word = normalize_state(state)
    if word in CAPACITY_STATES:
        return f"a job ended {word}" + (f" on {node}" if node else "")
    if reason and reason != "None" and _CAPACITY_REASON.search(reason):
        return f"jobs wait: {reason}"
    return None
