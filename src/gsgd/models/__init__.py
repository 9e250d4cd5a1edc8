"""Models of the paper's experiments, deterministic from a seed."""

from gsgd.models.mlp import MLP, mlp

__all__ = ["MLP", "mlp"]
