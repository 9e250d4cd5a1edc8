"""What G-SGD needs to know about a model: its positively scalable chains (G-blocks).

A G-block is a chain of layers W^0 .. W^{n-1} joined by positively homogeneous maps. Every
layer's weight is viewed as a tensor of shape ``(out, in, taps)``: ``taps`` parallel edges join
each (out-unit, in-unit) pair (1 for Linear, kh*kw for a conv, HW for a Linear after a flatten).
The block's node layers are 0..n; layers 1..n-1 are hidden units, layer 0 the block input and
layer n its output (docs/math.md sections 3 and 8).

This module only holds the description; ``gsgd.discovery`` finds it in an ``nn.Module``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class StructureError(ValueError):
    """A model (or part of one) that G-SGD cannot treat exactly; the message names where."""


@dataclass(frozen=True)
class Layer:
    """One layer of a G-block, its weight viewed as ``(out_units, in_units, taps)``.

    ``centre`` is the designated tap (the centre tap of a conv kernel, 0 otherwise).
    ``kind`` is ``"linear"``, ``"conv"``, ``"flatten-linear"`` (a Linear reading a flattened
    conv output: in-unit c owns the ``taps`` = HW consecutive input features of channel c) or
    ``"bn-affine"`` (a batch norm's affine pair: ``out_units`` = C channels, ``in_units`` = 1
    virtual input, ``taps`` = 1; gamma (C,) is viewed as (C, 1, 1), beta is the bias; exact,
    since each channel has exactly one incoming edge gamma_c, as in the real graph).
    ``approx_bn``: the layer's outputs are batch-normalised and the layer takes part under
    ``batchnorm="approximate"``: its G-space direction is scaled per output row by the row's
    weight norm (the paper's heuristic; NOT invariant).
    """

    module: str
    weight: str
    bias: str | None
    out_units: int
    in_units: int
    taps: int = 1
    centre: int = 0
    kind: str = "linear"
    approx_bn: bool = False

    @property
    def num_weights(self) -> int:
        """m contribution: weights plus biases."""
        return self.out_units * self.in_units * self.taps + (self.out_units if self.bias else 0)


@dataclass(frozen=True)
class Block:
    """A positively scalable chain: consecutive layers share their hidden units."""

    layers: tuple[Layer, ...]

    def __post_init__(self) -> None:
        if not self.layers:
            raise StructureError("a G-block needs at least one layer")
        for prev, nxt in zip(self.layers, self.layers[1:], strict=False):
            if prev.out_units != nxt.in_units:
                raise StructureError(
                    f"G-block layers {prev.module!r} -> {nxt.module!r}: {prev.out_units} outputs "
                    f"do not match {nxt.in_units} inputs"
                )

    @property
    def widths(self) -> tuple[int, ...]:
        """Node-layer widths (h_0, ..., h_n)."""
        return (self.layers[0].in_units,) + tuple(layer.out_units for layer in self.layers)

    @property
    def num_weights(self) -> int:
        """m: number of weights and biases in the block."""
        return sum(layer.num_weights for layer in self.layers)

    @property
    def num_hidden(self) -> int:
        """H: number of hidden units (channels for convs)."""
        return sum(self.widths[1:-1])

    @property
    def num_basis_paths(self) -> int:
        """m - H: the dimension of G-space for this block."""
        return self.num_weights - self.num_hidden

    @property
    def param_names(self) -> tuple[str, ...]:
        names: list[str] = []
        for layer in self.layers:
            names.append(layer.weight)
            if layer.bias:
                names.append(layer.bias)
        return tuple(names)


@dataclass(frozen=True)
class Structure:
    """The G-blocks of a model, the parameters left to plain SGD, and why chains ended."""

    blocks: tuple[Block, ...]
    plain: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def num_weights(self) -> int:
        return sum(b.num_weights for b in self.blocks)

    @property
    def approximate(self) -> bool:
        """True if any layer uses the approximate batch-norm heuristic (not invariant)."""
        return any(layer.approx_bn for b in self.blocks for layer in b.layers)

    @property
    def num_hidden(self) -> int:
        return sum(b.num_hidden for b in self.blocks)

    def summary(self) -> str:
        """A printable table: blocks, layers, widths, m, H, m - H, parameters left to SGD."""
        lines = [
            f"G-structure: {len(self.blocks)} block(s), m = {self.num_weights}, "
            f"H = {self.num_hidden}, basis paths m - H = {self.num_weights - self.num_hidden}"
        ]
        if self.approximate:
            lines.append("  APPROXIMATE: batch norm heuristic (batchnorm='approximate'); "
                         "G-SGD is not invariant under G for the marked layers")
        for i, block in enumerate(self.blocks):
            widths = "-".join(str(w) for w in block.widths)
            lines.append(
                f"  block {i}: widths {widths}  m = {block.num_weights}  H = {block.num_hidden}"
                f"  m - H = {block.num_basis_paths}"
            )
            for layer in block.layers:
                shape = f"{layer.out_units}x{layer.in_units}" + (
                    f"x{layer.taps}" if layer.taps > 1 else ""
                )
                bias = " +bias" if layer.bias else ""
                approx = "  approximate (BN heuristic)" if layer.approx_bn else ""
                lines.append(f"    {layer.module:<24} {layer.kind:<15} {shape}{bias}{approx}")
        if self.plain:
            lines.append("  plain SGD: " + ", ".join(self.plain))
        else:
            lines.append("  plain SGD: (none)")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def layer_view(weight: torch.Tensor, layer: Layer) -> torch.Tensor:
    """View a layer's weight as ``(out, in, taps)`` (shares storage; no copy).

    A ``"bn-affine"`` layer's gamma (C,) becomes (C, 1, 1).
    """
    shape = (layer.out_units, layer.in_units, layer.taps)
    if weight.numel() != layer.out_units * layer.in_units * layer.taps:
        raise StructureError(
            f"{layer.module}: weight {tuple(weight.shape)} does not hold "
            f"{layer.out_units}x{layer.in_units}x{layer.taps} edges"
        )
    if not weight.is_contiguous():
        raise StructureError(
            f"{layer.module}: weight must be contiguous (got strides {weight.stride()}); "
            "this optimizer needs contiguous weights: convert the model with "
            "model.to(memory_format=torch.contiguous_format) (GSGD takes channels_last)"
        )
    return weight.view(shape)


def layer_from_module(name: str, module: nn.Module, kind: str | None = None,
                      in_units: int | None = None) -> Layer:
    """Describe a Linear, Conv2d or batch norm module as a :class:`Layer` (``name.weight``...).

    A batch norm stands for its affine pair (kind ``"bn-affine"``, see :class:`Layer`).
    """
    prefix = f"{name}." if name else ""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.affine or module.weight is None or module.bias is None:
            raise StructureError(f"{name}: batch norm without affine parameters has no "
                                 "scalable incoming edge; it cannot be a G-block layer")
        return Layer(name, f"{prefix}weight", f"{prefix}bias", module.num_features, 1, 1, 0,
                     kind or "bn-affine")
    bias = f"{prefix}bias" if getattr(module, "bias", None) is not None else None
    if isinstance(module, nn.Linear):
        if in_units is not None and in_units != module.in_features:
            if module.in_features % in_units:
                raise StructureError(
                    f"{name}: Linear with {module.in_features} inputs cannot read "
                    f"{in_units} flattened channels"
                )
            taps = module.in_features // in_units
            return Layer(name, f"{prefix}weight", bias, module.out_features, in_units, taps, 0,
                         kind or "flatten-linear")
        return Layer(name, f"{prefix}weight", bias, module.out_features, module.in_features,
                     1, 0, kind or "linear")
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise StructureError(
                f"{name}: Conv2d with groups={module.groups} is not supported "
                "(only groups=1 convs form G-blocks)"
            )
        kh, kw = module.kernel_size
        return Layer(name, f"{prefix}weight", bias, module.out_channels, module.in_channels,
                     kh * kw, (kh // 2) * kw + kw // 2, kind or "conv")
    raise StructureError(
        f"{name}: {type(module).__name__} is not a supported layer "
        "(Linear, Conv2d or batch norm)"
    )
