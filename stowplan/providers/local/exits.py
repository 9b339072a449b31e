"""How an attempt ended, for people and for retries: ``exit.json`` mapped to a state, a failure
class and a message. Pure: the records are read elsewhere (``attempts.py``)."""

from __future__ import annotations

import signal

from stowplan.providers.base import ProviderState
from stowplan.providers.local.attempts import ExitRecord
from stowplan.providers.local.render import format_bytes
from stowplan.spec.models import FailureClass

STDERR_TAIL_CHARS = 500

# Signals a program raises on itself when it crashes: its own bug, like a non-zero exit.
CRASH_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGABRT, signal.SIGFPE, signal.SIGILL, signal.SIGSYS, signal.SIGTRAP}
)

NEAR_LIMIT = 0.9
"""A task that was seen using this share of its memory limit, or a machine seen with less than
``1 - NEAR_LIMIT`` of its memory available, may have been OOM-killed between two samples."""


def classify_exit(
    info: ExitRecord, *, stderr_tail: str = ""
) -> tuple[ProviderState, FailureClass | None, str]:
    """Map an exit record to our state, failure class and a message for people. Total."""
    tail = f": {stderr_tail}" if stderr_tail else ""
    match info.reason:
        case "cancelled":
            return ProviderState.CANCELLED, None, info.message or "cancelled"
        case "timeout":
            limit = "its" if info.timeout_s is None else f"the {info.timeout_s:g} s"
            return ProviderState.FAILED, FailureClass.TIMEOUT, f"killed after {limit} timeout"
        case "memory":
            limit = "its limit" if info.memory_limit is None else format_bytes(info.memory_limit)
            return (
                ProviderState.FAILED,
                FailureClass.OUT_OF_MEMORY,
                f"killed: memory use reached {format_bytes(info.peak_rss)}, over the declared "
                f"limit of {limit}",
            )
        case "missing_output" | "bad_output":
            return ProviderState.FAILED, FailureClass.USER_ERROR, _outputs_message(info)
        case "launcher_error":
            return (
                ProviderState.FAILED,
                FailureClass.NODE_FAILURE,
                f"supervisor failed: {info.message or 'no reason recorded'}",
            )
        case "exited":
            if info.signal is not None:
                name = _signal_name(info.signal)
                if info.signal == signal.SIGKILL:
                    # NOTE: we send SIGKILL only with reason timeout/memory/cancelled; this one
                    # came from the kernel's OOM killer or from outside (kill -9, preemption).
                    oom = _oom_evidence(info)
                    if oom:
                        return ProviderState.FAILED, FailureClass.OUT_OF_MEMORY, f"{oom}{tail}"
                    return (
                        ProviderState.FAILED,
                        FailureClass.NODE_FAILURE,
                        f"killed by signal 9 from outside (SIGKILL, not sent by stowplan; "
                        f"{_no_oom_evidence(info)}){tail}",
                    )
                if info.signal in CRASH_SIGNALS:
                    return ProviderState.FAILED, FailureClass.USER_ERROR, f"crashed: {name}{tail}"
                return ProviderState.FAILED, FailureClass.NODE_FAILURE, f"killed by {name}{tail}"
            if info.exit_code == 0:
                return ProviderState.SUCCEEDED, None, ""
            if info.exit_code is not None:
                return (
                    ProviderState.FAILED,
                    FailureClass.USER_ERROR,
                    f"exit code {info.exit_code}{tail}",
                )
            return (
                ProviderState.FAILED,
                FailureClass.NODE_FAILURE,
                "the exit record has neither an exit code nor a signal",
            )
        case _:
            return (
                ProviderState.FAILED,
                FailureClass.NODE_FAILURE,
                f"unrecognised exit reason {info.reason!r}",
            )


def _oom_evidence(info: ExitRecord) -> str:
    """Why an unexplained SIGKILL is taken for the OOM killer's, or ``""`` when nothing says so."""
    if info.oom_kills:
        return (
            "killed by the kernel's out-of-memory killer (its memory cgroup counted "
            f"{info.oom_kills} OOM kill{'s' if info.oom_kills != 1 else ''} during the attempt)"
        )
    if info.kernel_oom:
        return "killed by the kernel's out-of-memory killer (the kernel log names it)"
    if info.memory_limit and info.peak_rss >= NEAR_LIMIT * info.memory_limit:
        return (
            f"killed by SIGKILL, not sent by stowplan, after using {format_bytes(info.peak_rss)}"
            f" of its {format_bytes(info.memory_limit)} limit: most likely out of memory"
        )
    if (
        info.memory_available is not None
        and info.memory_total
        and info.memory_available < (1 - NEAR_LIMIT) * info.memory_total
    ):
        return (
            "killed by SIGKILL, not sent by stowplan, while the machine had only "
            f"{format_bytes(info.memory_available)} of {format_bytes(info.memory_total)} "
            "available: most likely the kernel's out-of-memory killer"
        )
    return ""


def _no_oom_evidence(info: ExitRecord) -> str:
    """What was checked before calling a SIGKILL an outside one."""
    checks = [
        "its memory cgroup counted no OOM kill"
        if info.oom_kills is not None
        else "its memory cgroup's OOM count was unreadable",
        "the kernel log names no OOM kill of it"
        if info.kernel_oom is not None
        else "the kernel log was unreadable",
    ]
    used = f"it used at most {format_bytes(info.peak_rss)}"
    if info.memory_limit:
        used += f" of its {format_bytes(info.memory_limit)} limit"
    return "; ".join([*checks, used])


def _outputs_message(info: ExitRecord) -> str:
    parts = []
    if info.missing:
        parts.append(f"declared outputs are missing: {', '.join(info.missing)}")
    if info.refused:
        parts.append(f"declared outputs refused: {'; '.join(info.refused)}")
    code = "exited 0" if info.exit_code == 0 else "ended"
    return f"{code} but " + "; ".join(parts or ["declared outputs could not be checked"])


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def tail_text(data: bytes, limit: int = STDERR_TAIL_CHARS) -> str:
    """The last whole lines of ``data`` that fit in ``limit`` characters."""
    text = data.decode("utf-8", errors="replace").rstrip()
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    newline = cut.find("\n")
    return cut[newline + 1 :] if 0 <= newline < len(cut) - 1 else cut
