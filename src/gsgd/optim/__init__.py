"""Optimizers: GSGD and the baselines it is compared with."""

from gsgd.optim.common import NonFiniteError
from gsgd.optim.gsgd import GSGD

__all__ = ["GSGD", "NonFiniteError"]
