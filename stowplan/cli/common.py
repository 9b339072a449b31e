"""What every ``stowplan`` command shares: its consoles, counted nouns, flag types, and the
project's run store with its run id prefixes.

Kept light: ``build_parser()`` imports the flag types for every invocation, so rich, the spec
models and the store are imported inside the functions that need them. What talks to providers
and the control plane is in ``cli/control.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

# one definition of counted nouns for every message (placement and actors use it too)
from stowplan.spec.units import plural, verb

if TYPE_CHECKING:
    from rich.console import Console

    from stowplan.provenance.store import RunStore
    from stowplan.spec.loader import LoadedProject

__all__ = [
    "PIPE_WIDTH",
    "budget_seconds",
    "choice",
    "hex_prefix",
    "make_console",
    "open_store",
    "plural",
    "resolve_run",
    "verb",
]

PIPE_WIDTH: Final = 1 << 16
"""Columns a table may take when it goes to a file or another program: all it needs, so
nothing is cut or folded (rich sizes a table to its content, not to the console)."""


def make_console(*, stderr: bool = False, **kwargs: Any) -> Console:
    """The console a command prints through.

    On a terminal it is as wide as the terminal. Piped or redirected, rich would assume 80
    columns and cut or fold every wider table; there the console takes all the width the
    content needs instead, unless ``COLUMNS`` says otherwise.
    """
    from rich.console import Console

    stream: IO[str] = sys.stderr if stderr else sys.stdout
    kwargs.setdefault("highlight", False)
    if "width" not in kwargs and not _is_terminal(stream) and not os.environ.get("COLUMNS"):
        kwargs["width"] = PIPE_WIDTH
    return Console(stderr=stderr, **kwargs)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream (pytest's capture)
        return False


_HEX: Final = re.compile(r"[0-9a-f]+")


# -- the project's run store -----------------------------------------------------------------


def open_store(args: argparse.Namespace) -> tuple[RunStore, tuple[LoadedProject, Path]]:
    """The run store of the project at ``--project-dir`` (or above the working directory),
    with the project and its state directory; SpecError when nothing was run there yet."""
    from stowplan.errors import SpecError
    from stowplan.provenance.store import RunStore
    from stowplan.session import project_paths
    from stowplan.spec.loader import load_project

    project = load_project(search_from=args.project_dir or Path.cwd())
    state_dir, store_path = project_paths(project)
    if not store_path.exists():
        raise SpecError(
            f"no run store at {store_path}",
            hint="run an experiment first (stowplan run FILE), or pass --project-dir",
        )
    return RunStore(store_path), (project, state_dir)


def resolve_run(store: RunStore, prefix: str) -> str:
    """The run id that ``prefix`` starts; SpecError when none or several do."""
    from stowplan.errors import SpecError

    try:
        return store.resolve_run(prefix)
    except (KeyError, ValueError) as e:
        msg = e.args[0] if e.args else str(e)
        raise SpecError(
            str(msg), hint="give more characters of the run id (stowplan status)"
        ) from None


# -- flag types (argparse ``type=``): a bad value is a usage error, exit 2 ------------------


def budget_seconds(text: str) -> float:
    """``--budget``: deterministic seconds of solver search, under the same bounds as
    ``[placement] budget`` in stowplan.toml (the one definition of them is that field)."""
    import msgspec

    from stowplan.spec.models import PlacementSettings

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds; pass e.g. --budget 0.5"
        ) from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a finite number of seconds; pass e.g. --budget 0.5"
        )
    try:
        msgspec.convert({"budget": value}, PlacementSettings)
    except msgspec.ValidationError as e:
        why = str(e).split(" - at ")[0].replace("Expected `float` ", "must be ")
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of range ({why}); pass e.g. --budget 0.5 "
            "(deterministic seconds of solver search, as [placement] budget in stowplan.toml)"
        ) from None
    return value


def choice(values: Iterable[str], *, what: str, fold: bool = True) -> Any:
    """An argparse ``type=`` that accepts one of ``values`` (any case when ``fold``) and
    names them all when given anything else."""
    allowed = list(values)
    by_key = {(v.upper() if fold else v): v for v in allowed}

    def parse(text: str) -> str:
        got = by_key.get(text.upper() if fold else text)
        if got is None:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {what}; use one of: {', '.join(allowed)}"
            )
        return got

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def hex_prefix(what: str, *, shortest: int, longest: int = 64) -> Any:
    """An argparse ``type=`` for a hash or its prefix: ``shortest`` to ``longest`` hex digits
    (an empty or one-digit prefix would match almost anything)."""

    def parse(text: str) -> str:
        t = text.strip().lower()
        if not (shortest <= len(t) <= longest) or not _HEX.fullmatch(t):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {what}: give {shortest} to {longest} hex digits "
                "(0-9, a-f), as `stowplan audit verify` printed them"
            )
        return t

    parse.__name__ = what
    return parse
