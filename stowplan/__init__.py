"""stowplan: reproducible experiment orchestration.

The user-facing names are re-exported here; everything else may change between releases.
Importing ``stowplan`` loads no Ray, no solver and no provider SDK.
"""

from stowplan.errors import (
    InternalError,
    PlacementInfeasible,
    ProviderError,
    SpecError,
    StowplanError,
)
from stowplan.spec.canonical import attempt_key, canonical_json, spec_hash
from stowplan.spec.loader import load_experiment, load_project
from stowplan.spec.models import (
    DataInput,
    Experiment,
    FailureClass,
    Policy,
    ProjectConfig,
    Resources,
    RetryPolicy,
    Sweep,
    Task,
)

__version__ = "0.1.0"

__all__ = [
    "DataInput",
    "Experiment",
    "FailureClass",
    "InternalError",
    "PlacementInfeasible",
    "Policy",
    "ProjectConfig",
    "ProviderError",
    "Resources",
    "RetryPolicy",
    "SpecError",
    "StowplanError",
    "Sweep",
    "Task",
    "__version__",
    "attempt_key",
    "canonical_json",
    "load_experiment",
    "load_project",
    "spec_hash",
]
