"""Models of the paper's experiments, deterministic from a seed."""

from gsgd.models.cnn import BasicBlock, PlainNet, ResNet, plainnet, resnet
from gsgd.models.init import he_init
from gsgd.models.mlp import MLP, mlp

__all__ = ["MLP", "BasicBlock", "PlainNet", "ResNet", "he_init", "mlp", "plainnet", "resnet"]
