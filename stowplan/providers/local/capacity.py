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


class Capacity(Struct, frozen=True, kw_only=True):
    """The machine's share this driver may fill."""

    cpus: float
    memory: int
    gpus: int

    def fits(self, held: Iterable[Started], req: LocalRequest) -> bool:
        """Does ``req`` fit beside what ``held`` holds?"""
        held = list(held)
        cpus = sum(h.cpus for h in held) + req.cpus
        memory = sum(h.memory for h in held) + req.memory
        gpus = sum(h.gpus for h in held) + req.gpus
        return cpus <= self.cpus + 1e-9 and memory <= self.memory and gpus <= self.gpus
