"""The Slurm provider: job arrays through sbatch on a login node reached over SSH."""

from stowplan.providers.slurm.driver import SlurmProvider
from stowplan.providers.slurm.render import SlurmRequest

__all__ = ["SlurmProvider", "SlurmRequest"]
