"""stowplan: reproducible experiment orchestration."""

__version__ = "0.1.0"
