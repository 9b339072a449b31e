"""The one command shell around the sans-IO core, and the ports its adapters supply.

Dependency direction: ``spec -> scheduler, placement -> providers, provenance -> shell ->
actors, simulator -> cli``. Nothing here imports Ray; ``AsyncioClock`` is the only place that
touches an event loop, and only when a real-time adapter asks for it.
"""

from stowplan.shell.clocks import AsyncioClock, run_now
from stowplan.shell.command import PROVIDER_BACKOFF, CommandShell, ShellConfig, ShellCounters
from stowplan.shell.ports import Clock, ProviderPort, RunRecords, Solver, Wake

__all__ = [
    "PROVIDER_BACKOFF",
    "AsyncioClock",
    "Clock",
    "CommandShell",
    "ProviderPort",
    "RunRecords",
    "ShellConfig",
    "ShellCounters",
    "Solver",
    "Wake",
    "run_now",
]
