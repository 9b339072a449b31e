"""The local provider: attempts run as processes on this machine, the embedded default.

``driver`` holds the provider and its FIFO (its docstring is the theory of operation);
``render`` the pure plan; ``attempts`` the attempt directory, its records and the claim;
``capacity`` the resource accounting; ``exits`` how an ended attempt is classified.
"""

from stowplan.providers.local.attempts import START_GRACE_S, ExitRecord, LauncherRecord
from stowplan.providers.local.driver import LOG_POLL_S, QUEUED_GRACE_S, LocalProvider
from stowplan.providers.local.exits import (
    CRASH_SIGNALS,
    NEAR_LIMIT,
    STDERR_TAIL_CHARS,
    classify_exit,
    tail_text,
)
from stowplan.providers.local.render import LocalRequest, format_bytes

__all__ = [
    "CRASH_SIGNALS",
    "LOG_POLL_S",
    "NEAR_LIMIT",
    "QUEUED_GRACE_S",
    "START_GRACE_S",
    "STDERR_TAIL_CHARS",
    "ExitRecord",
    "LauncherRecord",
    "LocalProvider",
    "LocalRequest",
    "classify_exit",
    "format_bytes",
    "tail_text",
]
