"""The import-recording hook a launcher puts on a Python task's ``PYTHONPATH``.

This directory holds a ``sitecustomize`` module (see its docstring), found by every Python
interpreter that the task starts with the launcher's environment. The directory is a package
only so that it ships with stowplan; nothing imports it as ``stowplan.providers.importhook``.
"""

from __future__ import annotations

from pathlib import Path

HOOK_DIR = str(Path(__file__).resolve().parent)
"""The directory to put first on a task's ``PYTHONPATH``."""
USED_FILE = "stowplan-used.jsonl"
"""The file, in the attempt directory, that the hook appends one line per process to."""
USED_FILE_ENV = "STOWPLAN_USED_FILE"
"""The variable naming that file: the hook records nothing without it."""
RECORD_IMPORTS_ENV = "STOWPLAN_RECORD_IMPORTS"
"""Set to ``0`` in a task's ``env`` to turn the hook off for it."""

__all__ = ["HOOK_DIR", "RECORD_IMPORTS_ENV", "USED_FILE", "USED_FILE_ENV"]
