"""Optimizers: GSGD, G-space Adam (GAdam / GAdamW) and the baselines they are compared with.

Baselines: :class:`PathSGD`, :class:`ENorm` (a post-step for any optimizer) and :class:`ENormSGD`.
Plain SGD and Adam are torch's own; SGD from the paper's skeleton initialisation
(:func:`gsgd.group.skeleton_init`) is the fair control for G-SGD.
"""

from gsgd.optim.common import InitScaleWarning, NonFiniteError, PlainParametersWarning
from gsgd.optim.enorm import ENorm, ENormSGD
from gsgd.optim.gadam import GAdam, GAdamW
from gsgd.optim.gsgd import GSGD
from gsgd.optim.pathsgd import PathSGD

__all__ = ["ENorm", "ENormSGD", "GAdam", "GAdamW", "GSGD", "InitScaleWarning", "NonFiniteError",
           "PathSGD", "PlainParametersWarning"]
