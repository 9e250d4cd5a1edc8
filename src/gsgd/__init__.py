"""gsgd: G-SGD, optimizing ReLU networks in their positively scale-invariant space.

The common case is one line: ``GSGD(model, lr=...)``; see the README for the rest.
"""

from gsgd.conditioning import PathCondResult, pathcond
from gsgd.discovery import discover
from gsgd.group import canonical_form, random_rescale, skeleton_init
from gsgd.optim import (
    GSGD,
    ENorm,
    ENormSGD,
    GAdam,
    GAdamW,
    InitScaleWarning,
    NonFiniteError,
    PathSGD,
    PlainParametersWarning,
)
from gsgd.structure import Block, Layer, Structure, StructureError

__version__ = "0.1.0"

__all__ = [
    "GSGD", "GAdam", "GAdamW", "PathSGD", "ENorm", "ENormSGD", "NonFiniteError",
    "InitScaleWarning", "PlainParametersWarning", "discover",
    "skeleton_init", "pathcond", "PathCondResult",
    "random_rescale", "canonical_form", "Structure", "Block", "Layer", "StructureError",
]
