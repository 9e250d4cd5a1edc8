"""The paper's convolutional networks: PlainNet-N and the CIFAR-style ResNet-N (He et al. 2016).

Both take ``in_channels x H x W`` inputs (1x28x28 MNIST, 3x32x32 CIFAR; any size works thanks to
global average pooling) and are built deterministically from a seed.

- Depth 6n+2 (20, 32, 44, 56, 110): a 3x3 stem conv, three stages of 2n 3x3 convs with widths
  16, 32, 64 (stages 2 and 3 start with a stride-2 conv), global average pooling, a Linear.
  ResNet groups the stage convs in n BasicBlocks (conv-ReLU-conv + shortcut, ReLU); its
  shortcuts are option A (subsample + zero-pad channels, no parameters) by default.
- Depth 34 (the paper's PlainNet-34 / ResNet-34): stages of [3, 4, 6, 3] blocks of two 3x3 convs,
  widths 64, 128, 256, 512; shortcuts are option B (1x1 conv projection) by default.

With ``batchnorm=True`` every conv is followed by BatchNorm2d (conv-BN-ReLU); then G-SGD needs
``batchnorm="exact"`` or ``"approximate"`` (see ``gsgd.discovery``). G-blocks found by
:func:`gsgd.discovery.discover` (BN-free): one per residual branch [conv1, conv2] for ResNet, one
chain through the whole PlainNet (``cut="stages"`` gives the paper's one block per stage).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_WIDTHS = (16, 32, 64)
WIDE_WIDTHS = (64, 128, 256, 512)
STAGES_34 = (3, 4, 6, 3)


def stage_layout(depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(blocks per stage, default widths) of depth 6n+2 or 34; each block has two convs."""
    if depth == 34:
        return STAGES_34, WIDE_WIDTHS
    if depth >= 8 and (depth - 2) % 6 == 0:
        n = (depth - 2) // 6
        return (n, n, n), CIFAR_WIDTHS
    raise ValueError(f"depth={depth} is not supported: use 6n+2 (20, 32, 44, 56, 110) or 34")


def _init(model: nn.Module) -> None:
    """He (fan-out) init for convs, BN gamma 1 / beta 0 (the CIFAR ResNet convention)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class ConvUnit(nn.Module):
    """conv 3x3 -> [BN] -> ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, batchnorm: bool = False,
                 bias: bool = False) -> None:
        super().__init__()
        self.conv = conv3x3(cin, cout, stride, bias)
        self.bn = nn.BatchNorm2d(cout) if batchnorm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad channels cin -> cout."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.before = (cout - cin) // 2
        self.after = cout - cin - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))


class BasicBlock(nn.Module):
    """conv1 -> [BN] -> ReLU -> conv2 -> [BN] -> (+ shortcut) -> ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, batchnorm: bool = False,
                 bias: bool = False, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride, bias)
        self.bn1 = nn.BatchNorm2d(cout) if batchnorm else None
        self.conv2 = conv3x3(cout, cout, 1, bias)
        self.bn2 = nn.BatchNorm2d(cout) if batchnorm else None
        self.shortcut: nn.Module
        if stride == 1 and cin == cout:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(cin, cout, stride)
        else:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride=stride, bias=bias)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            self.shortcut = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if self.bn1 is not None:
            out = self.bn1(out)
        out = self.conv2(F.relu(out))
        if self.bn2 is not None:
            out = self.bn2(out)
        return F.relu(out + self.shortcut(x))


class _Classifier(nn.Module):
    """Shared body: stem, stages ``stage1..stageS``; head: global average pooling, Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s in range(self.num_stages):
            x = getattr(self, f"stage{s + 1}")(x)
        return self._head(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PlainNet(_Classifier):
    """Stem conv, stages of 3x3 convs without skip connections, global average pooling, Linear.

    ``stages[s]`` counts blocks of two convs in stage s; stage s > 0 starts with a stride-2 conv.
    """

    def __init__(self, stages: Sequence[int], widths: Sequence[int], in_channels: int = 3,
                 num_classes: int = 10, batchnorm: bool = False, bias: bool = False) -> None:
        super().__init__()
        _check_layout(stages, widths, in_channels, num_classes)
        self.stem = ConvUnit(in_channels, widths[0], 1, batchnorm, bias)
        cin = widths[0]
        for s, (blocks, width) in enumerate(zip(stages, widths, strict=True)):
            units = []
            for k in range(2 * blocks):
                stride = 2 if s > 0 and k == 0 else 1
                units.append(ConvUnit(cin, width, stride, batchnorm, bias))
                cin = width
            self.add_module(f"stage{s + 1}", nn.Sequential(*units))
        self.num_stages = len(stages)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)


class ResNet(_Classifier):
    """Stem conv, stages of BasicBlocks, global average pooling, Linear (He et al. 2016)."""

    def __init__(self, stages: Sequence[int], widths: Sequence[int], in_channels: int = 3,
                 num_classes: int = 10, batchnorm: bool = False, bias: bool = False,
                 shortcut: str = "A") -> None:
        super().__init__()
        _check_layout(stages, widths, in_channels, num_classes)
        if shortcut not in ("A", "B"):
            raise ValueError(f"ResNet: shortcut={shortcut!r} is not supported: 'A' (zero-pad) "
                             "or 'B' (1x1 projection)")
        self.stem = ConvUnit(in_channels, widths[0], 1, batchnorm, bias)
        cin = widths[0]
        for s, (blocks, width) in enumerate(zip(stages, widths, strict=True)):
            units = []
            for k in range(blocks):
                stride = 2 if s > 0 and k == 0 else 1
                units.append(BasicBlock(cin, width, stride, batchnorm, bias, shortcut))
                cin = width
            self.add_module(f"stage{s + 1}", nn.Sequential(*units))
        self.num_stages = len(stages)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)


def _check_layout(stages: Sequence[int], widths: Sequence[int], in_channels: int,
                  num_classes: int) -> None:
    if not stages or len(stages) != len(widths) or any(int(b) < 1 for b in stages) \
            or any(int(w) < 1 for w in widths):
        raise ValueError(f"need one positive block count and width per stage, got "
                         f"stages={tuple(stages)}, widths={tuple(widths)}")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels={in_channels} and num_classes={num_classes} must be >= 1")


def _build(cls, depth: int, in_channels: int, num_classes: int, batchnorm: bool, bias: bool,
           widths: Sequence[int] | None, seed: int, **extra) -> nn.Module:
    stages, default_widths = stage_layout(depth)
    widths = tuple(widths) if widths is not None else default_widths
    if len(widths) != len(stages):
        raise ValueError(f"depth {depth} has {len(stages)} stages; got widths {widths}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(stages, widths, in_channels, num_classes, batchnorm, bias, **extra)
    model.depth = depth
    return model


def plainnet(depth: int = 20, in_channels: int = 3, num_classes: int = 10,
             batchnorm: bool = False, bias: bool = False, widths: Sequence[int] | None = None,
             seed: int = 0) -> PlainNet:
    """PlainNet-``depth`` (6n+2 or 34), deterministic from ``seed``; ``widths`` per stage."""
    return _build(PlainNet, depth, in_channels, num_classes, batchnorm, bias, widths, seed)


def resnet(depth: int = 20, in_channels: int = 3, num_classes: int = 10,
           batchnorm: bool = False, bias: bool = False, widths: Sequence[int] | None = None,
           shortcut: str | None = None, seed: int = 0) -> ResNet:
    """ResNet-``depth`` (6n+2 or 34), deterministic from ``seed``.

    ``shortcut``: "A" (zero-pad, the CIFAR default for 6n+2) or "B" (1x1 projection, the default
    for depth 34).
    """
    shortcut = shortcut or ("B" if depth == 34 else "A")
    return _build(ResNet, depth, in_channels, num_classes, batchnorm, bias, widths, seed,
                  shortcut=shortcut)
