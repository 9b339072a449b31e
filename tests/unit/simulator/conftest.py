from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
# the large traces: $STOWPLAN_TRACES, for the team ../shared/traces beside the checkout
TRACES = Path(os.environ.get("STOWPLAN_TRACES", ROOT.parent / "shared" / "traces"))
CLUSTERS = ROOT / "examples" / "clusters"
SHIPPED = ROOT / "examples" / "traces"
"""The small traces the repository ships: tests that need only these never skip."""


@pytest.fixture
def traces() -> Path:
    if not TRACES.is_dir():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"no trace folder at {TRACES}: CI must have shared/ beside the checkout")
        pytest.skip(f"no trace folder at {TRACES} (set STOWPLAN_TRACES)")
    return TRACES


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
