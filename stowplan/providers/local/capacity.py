"""What the attempts this driver started hold of the machine, and whether the next one fits.

The driver counts the CPUs, memory and GPUs of the attempts it started (and of running attempts
an earlier instance started, once described) against the configured capacity; see the FIFO in
``driver.py`` for how requests wait.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

from msgspec import Struct

from stowplan.providers.local.render import LocalRequest


class Started(Struct, kw_only=True):
    """Capacity held by an attempt this instance started (or found running)."""

    dir: Path
    cpus: float
    memory: int
    gpus: int
    since: float
    launcher: subprocess.Popen[bytes] | None = None
    """The launcher's short-lived parent, which exits as soon as the launcher detaches."""
    after: str | None = None
    """The key of the attempt this one was handed to the supervisor to follow: until that one
    ends, this one holds nothing of its own (it asks no more than its predecessor, and runs
    only after it)."""
    sent: bool = True
    """Whether the supervisor was told to start it (after its predecessor, if any)."""
    keeper: bool = False
    """Started (or handed ahead) through the supervisor connected now, which sees it end."""


class Capacity(Struct, frozen=True, kw_only=True):
    """The machine's share this driver may fill."""

    cpus: float
    memory: int
    gpus: int

    def within(self, held: Started, req: LocalRequest) -> bool:
        """May ``req`` follow ``held`` in its place (asking no more of any resource)?"""
        return req.cpus <= held.cpus and req.memory <= held.memory and req.gpus <= held.gpus

    def fits(self, held: Iterable[Started], req: LocalRequest) -> bool:
        """Does ``req`` fit beside what ``held`` holds?"""
        held = list(held)
        cpus = sum(h.cpus for h in held) + req.cpus
        memory = sum(h.memory for h in held) + req.memory
        gpus = sum(h.gpus for h in held) + req.gpus
        return cpus <= self.cpus + 1e-9 and memory <= self.memory and gpus <= self.gpus
