"""Shared pieces of the project's optimizers: argument checks, parameter resolution, plain SGD."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn
from torch.optim.sgd import sgd as torch_sgd

from gsgd.basis import LayerRoutes, block_routes
from gsgd.structure import Block, Structure, StructureError, layer_view


class NonFiniteError(FloatingPointError):
    """A non-finite gradient or weight, or a zero designated route; the message names it."""


class PlainParametersWarning(UserWarning):
    """Some of the model's parameters are left to plain SGD; the message lists them and why."""


class InitScaleWarning(UserWarning):
    """The model's initialisation makes the G-space step badly scaled (see GSGD's ``init``)."""


ON_NONFINITE = ("raise", "skip")


def check_hyper_parameters(owner: str, hp: dict) -> None:
    """Raise ValueError naming the bad hyper-parameter of optimizer ``owner``."""
    def bad(name: str, why: str) -> ValueError:
        return ValueError(f"{owner}: invalid {name}={hp[name]!r}: {why}")

    if "lr" in hp and not (isinstance(hp["lr"], float | int | torch.Tensor) and hp["lr"] >= 0
                           and math.isfinite(hp["lr"])):
        raise bad("lr", "must be a finite number >= 0")
    for name in ("momentum", "weight_decay", "dampening"):
        if name in hp and not (isinstance(hp[name], float | int) and hp[name] >= 0
                               and math.isfinite(hp[name])):
            raise bad(name, "must be a finite number >= 0")
    if "momentum" in hp and hp["momentum"] >= 1:
        raise bad("momentum", "must be < 1")
    if hp.get("nesterov") and (hp.get("momentum", 0) <= 0 or hp.get("dampening", 0) != 0):
        raise ValueError(f"{owner}: nesterov=True requires momentum > 0 and dampening = 0")
    if "max_ratio" in hp and not (isinstance(hp["max_ratio"], float | int)
                                  and 1 < hp["max_ratio"] < math.inf):
        raise bad("max_ratio", "must be a number > 1 (the carrier ratios keep |R| in [1/B, B])")
    for name in ("compile", "maximize", "amsgrad", "decoupled_weight_decay", "decay_carriers"):
        if name in hp and not isinstance(hp[name], bool):
            raise bad(name, "must be True or False")
    if "betas" in hp and not (isinstance(hp["betas"], tuple | list) and len(hp["betas"]) == 2
                              and all(isinstance(b, float | int) and 0 <= b < 1
                                      for b in hp["betas"])):
        raise bad("betas", "must be two numbers in [0, 1)")
    if "eps" in hp and not (isinstance(hp["eps"], float | int) and hp["eps"] >= 0
                            and math.isfinite(hp["eps"])):
        raise bad("eps", "must be a finite number >= 0")
    if "bp_norm" in hp and not (isinstance(hp["bp_norm"], tuple | list)
                                and len(hp["bp_norm"]) == 2
                                and all(isinstance(x, float | int) and x >= 0 and math.isfinite(x)
                                        for x in hp["bp_norm"])):
        raise bad("bp_norm", "must be two finite numbers >= 0 (lam_pos, lam_neg)")
    if "on_nonfinite" in hp and hp["on_nonfinite"] not in ON_NONFINITE:
        raise bad("on_nonfinite", f"supported values are {ON_NONFINITE}")


def resolve_params(owner: str, params: nn.Module | Iterable, model: nn.Module | None
                   ) -> tuple[list, nn.Module, dict[str, nn.Parameter]]:
    """Accept a module (all its trainable parameters) or parameters / groups plus ``model=``.

    Returns (params or param groups, the model, the model's named parameters).
    """
    from gsgd.discovery import unwrap

    if isinstance(params, nn.Module):
        if model is not None and unwrap(model) is not unwrap(params):
            raise ValueError(f"{owner}: pass the model either positionally or as model=, not both")
        model = unwrap(params)
        params = [p for p in model.parameters() if p.requires_grad]
    elif model is None:
        raise ValueError(
            f"{owner}: needs the model to find its G-blocks: {owner}(model, lr=...) or "
            f"{owner}(params, lr=..., model=model)"
        )
    model = unwrap(model)
    params = [_listed(g) for g in params]  # generators inside groups are read once
    if not params:
        raise ValueError(f"{owner}: got an empty parameter list")
    named = dict(model.named_parameters())
    given = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    ours = {id(p) for p in named.values()}
    if not any(id(p) in ours for p in given if isinstance(p, torch.Tensor)):
        raise ValueError(f"{owner}: none of the given parameters belongs to the model "
                         f"({type(model).__name__}) passed as model=; pass that model's "
                         "parameters, or the model they belong to")
    meta = [n for n, p in named.items() if p.is_meta]
    if meta:
        raise ValueError(f"{owner}: parameter {meta[0]} is on the meta device (no values); "
                         "materialise the model first (model.to_empty(device=...) and "
                         "initialise it), then build the optimizer")
    return params, model, named


def _listed(group):
    """A param group with its parameters in a list (a tensor or a generator is accepted)."""
    if not isinstance(group, dict):
        return group
    params = group["params"]
    return {**group, "params": [params] if isinstance(params, torch.Tensor) else list(params)}


def momentum_direction(state: dict, d: torch.Tensor, mu: float, damp: float,
                       nesterov: bool) -> torch.Tensor:
    """Heavy-ball momentum in torch.optim.SGD's convention; the buffer lives in ``state``.

    buf = d (first step), else buf = mu * buf + (1 - damp) * d;  returns d + mu * buf if
    nesterov else buf.  With mu = 0 returns d and keeps no buffer.
    """
    if not mu:
        return d
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = d.detach().clone()
        state["momentum_buffer"] = buf
    else:
        buf.mul_(mu).add_(d, alpha=1 - damp)
    return d.add(buf, alpha=mu) if nesterov else buf


def plain_sgd_update(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                     group: dict) -> None:
    """torch.optim.SGD's own update (``torch.optim.sgd.sgd``: weight-space momentum / weight
    decay) for non-G parameters; new momentum buffers go into ``optimizer.state``."""
    if not params:
        return
    bufs = [optimizer.state[p].get("momentum_buffer") for p in params]
    torch_sgd(params, [p.grad for p in params], bufs, weight_decay=group["weight_decay"],
              momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
              nesterov=bool(group["nesterov"]), maximize=bool(group.get("maximize")))
    if group["momentum"]:
        for p, buf in zip(params, bufs, strict=True):
            optimizer.state[p]["momentum_buffer"] = buf


def bind_blocks(owner: str, structure: Structure, named: dict[str, nn.Parameter],
                param_groups: list[dict], one_group: bool = True, frozen_ok: bool = False,
                contiguous: bool = True
                ) -> list[tuple[Block, list[nn.Parameter], list[nn.Parameter | None], int]]:
    """Each block whose parameters the optimizer holds: (block, weights, biases, group index).

    A block with none of its parameters in ``param_groups`` is left out; one with only some of
    them raises ValueError (unless ``frozen_ok`` and every missing one has
    ``requires_grad=False``: a frozen layer, which the optimizer's step leaves out), as does
    (with ``one_group``) a block split over param groups. The group is returned by index:
    ``load_state_dict`` replaces the group dicts. Weights must be contiguous if ``contiguous``
    (else only their number of elements is checked).
    """
    group_of = {id(p): i for i, g in enumerate(param_groups) for p in g["params"]}
    bound = []
    for block in structure.blocks:
        missing = [n for n in block.param_names if n not in named]
        if missing:
            raise StructureError(f"{owner}: block parameters {missing} are not in the model")
        params = [named[n] for n in block.param_names]
        present = [id(p) in group_of for p in params]
        if not any(present):
            continue
        absent = [n for n, ok in zip(block.param_names, present, strict=True)
                  if not ok and not (frozen_ok and not named[n].requires_grad)]
        if absent:
            raise ValueError(
                f"{owner}: parameters {absent} belong to a G-block with parameters given to the "
                "optimizer; a G-block is updated as a whole, pass all of its parameters"
            )
        if one_group and len({group_of[id(p)] for p in params if id(p) in group_of}) != 1:
            raise ValueError(
                f"{owner}: all parameters of a G-block must be in one param group "
                f"(block {'-'.join(map(str, block.widths))}: {list(block.param_names)})"
            )
        weights = [named[layer.weight] for layer in block.layers]
        biases = [named[layer.bias] if layer.bias else None for layer in block.layers]
        for layer, w in zip(block.layers, weights, strict=True):
            # validates shape (and contiguity) now
            layer_view(w.detach() if contiguous else w.detach().contiguous(), layer)
        held = next(p for p in params if id(p) in group_of)
        bound.append((block, weights, biases, group_of[id(held)]))
    return bound


class BoundBlock(NamedTuple):
    """A G-block bound to the optimizer: its parameters, routes and param group (by index:
    ``load_state_dict`` replaces the group dicts)."""

    block: Block
    weights: list[nn.Parameter]
    biases: list[nn.Parameter | None]
    routes: tuple[LayerRoutes, ...]
    group: int
    shapes: tuple[tuple[int, int, int], ...]  # the (out, in, taps) view of each layer

    @property
    def approx_bn(self) -> bool:
        return any(layer.approx_bn for layer in self.block.layers)


def active_runs(active: list[bool]) -> list[tuple[int, int]]:
    """(start, stop) of every maximal run of True in ``active``."""
    runs, start = [], None
    for i, on in enumerate([*active, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    return runs


def layer_problem(layer, w: nn.Parameter, b: nn.Parameter | None, r: LayerRoutes) -> str | None:
    """What is wrong with one layer of a block, if anything (for the refusal message)."""
    view = w.detach().reshape(r.h_out, r.h_in, r.taps)
    checks = [(view, f"non-finite weight in {layer.weight}"),
              (w.grad, f"non-finite gradient for {layer.weight}"),
              (b, f"non-finite bias {layer.bias}"),
              (None if b is None else b.grad, f"non-finite gradient for {layer.bias}")]
    for t, message in checks:
        if t is not None and not torch.isfinite(t).all():
            return message
    flat = view.reshape(-1)
    for role, positions in (("parent", r.parent_flat(flat.device)),
                            ("child", r.child_flat(flat.device))):
        zero = (flat[positions] == 0).nonzero()
        if len(zero):
            o, i, t = r.unravel(int(positions[int(zero[0])]))
            return (f"zero designated ({role}) weight {layer.weight}[{o}, {i}"
                    f"{f', tap {t}' if r.taps > 1 else ''}]: it kills the designated routes "
                    "through it (re-initialise it, e.g. with gsgd.skeleton_init)")
    return None


class GBlockOptimizer(torch.optim.Optimizer):
    """Set-up shared by the optimizers that act on G-blocks (GSGD, PathSGD).

    Resolves the parameters, discovers (or takes) the structure, binds every G-block to its
    param group and lists the parameters left to plain SGD (:attr:`plain_parameters`).
    """

    structure: Structure
    plain_parameters: tuple[str, ...]
    #: the torch optimizer the parameters outside every G-block get (for messages)
    _plain_optimizer = "SGD"
    #: may a G-block have frozen layers (parameters with requires_grad=False, not given)?
    _frozen_ok = False
    #: does the step take weights of any memory layout (channels_last)?
    _any_layout = False

    def _setup(self, owner: str, params: nn.Module | Iterable, defaults: dict,
               model: nn.Module | None, structure: Structure | None,
               batchnorm: str | None = None
               ) -> list[tuple[Block, list[nn.Parameter], list[nn.Parameter | None], int]]:
        check_hyper_parameters(owner, defaults)
        params, model, named = resolve_params(owner, params, model)
        torch.optim.Optimizer.__init__(self, params, defaults)
        for group in self.param_groups:
            check_hyper_parameters(owner, group)
        if structure is None:
            from gsgd.discovery import discover

            structure = discover(model, batchnorm=batchnorm)
        elif batchnorm is not None:
            raise ValueError(f"{owner}: batchnorm= is a discovery option; with structure= given, "
                             "pass it to discover(model, batchnorm=...) instead")
        self.structure = structure
        self._owner = owner
        self._named = list(named.items())  # kept to rebind: copies, add_param_group
        bound = self._bind()
        if bound and self.plain_parameters:
            shown = ", ".join(self.plain_parameters[:8]) + (
                f", ... ({len(self.plain_parameters)} in all)"
                if len(self.plain_parameters) > 8 else "")
            why = "; ".join(structure.notes) or "they are in no chain of >= 2 layers"
            warnings.warn(f"{owner}: parameters outside every G-block get plain "
                          f"{self._plain_optimizer}: {shown} "
                          f"(why: {why}); see opt.summary()", PlainParametersWarning,
                          stacklevel=3)
        if not bound:
            why = "; ".join(structure.notes) or "no two layers are joined by a ReLU-family map"
            raise StructureError(
                f"{owner}: found no G-block (positively scalable chain of >= 2 Linear/Conv2d "
                f"layers) among the given parameters of {type(model).__name__} ({why}); "
                f"use torch.optim.{self._plain_optimizer} for such a model, or pass "
                "structure= with explicit blocks"
            )
        return bound

    def _bind(self) -> list[tuple[Block, list[nn.Parameter], list[nn.Parameter | None], int]]:
        """Bind the structure's G-blocks to the param groups; the rest is plain SGD."""
        named = dict(self._named)
        bound = bind_blocks(self._owner, self.structure, named, self.param_groups,
                            frozen_ok=self._frozen_ok, contiguous=not self._any_layout)
        in_blocks = {id(p) for _, ws, bs, _ in bound for p in ws + bs if p is not None}
        self._held = {id(p) for g in self.param_groups for p in g["params"]}
        self._plain = [p for g in self.param_groups for p in g["params"] if id(p) not in in_blocks]
        self._plain_group = {id(p): gi for gi, g in enumerate(self.param_groups)
                             for p in g["params"] if id(p) not in in_blocks}
        self._names = {id(p): n for n, p in named.items()}
        self.plain_parameters = tuple(self._names.get(id(p), "?") for p in self._plain)
        self._bound(bound)
        return bound

    def _bound(self, bound: list) -> None:
        """What a subclass keeps of the bound blocks (called on every (re)binding)."""
        self._blocks = bound

    def _bound_blocks(self, bound: list) -> list[BoundBlock]:
        """The bound blocks of a (re)binding (its parts are forgotten)."""
        self.__dict__.pop("_parts", None)
        return [BoundBlock(block, weights, biases, block_routes(block), gi,
                           tuple((la.out_units, la.in_units, la.taps) for la in block.layers))
                for block, weights, biases, gi in bound]

    def _active_parts(self) -> list[tuple[tuple[int, int, int], BoundBlock]]:
        """((block index, start, stop), part) of every run of layers that takes part in this
        step: a layer does only if the optimizer holds all its parameters and each has a
        gradient, so a frozen layer (``requires_grad=False``, or ``grad`` None) is never
        modified and cuts its block into runs of trainable layers, each a G-block of its own."""
        parts = []
        for k, bp in enumerate(self._blocks):
            active = [id(w) in self._held and w.grad is not None
                      and (b is None or (id(b) in self._held and b.grad is not None))
                      for w, b in zip(bp.weights, bp.biases, strict=True)]
            for start, stop in active_runs(active):
                whole = (start, stop) == (0, len(active))
                parts.append(((k, start, stop), bp if whole else self._part(k, start, stop)))
        return parts

    def _part(self, k: int, start: int, stop: int) -> BoundBlock:
        """Layers start..stop-1 of block k as a G-block of their own (kept per binding)."""
        parts = self.__dict__.setdefault("_parts", {})
        if (k, start, stop) not in parts:
            bp = self._blocks[k]
            block = Block(bp.block.layers[start:stop])
            parts[(k, start, stop)] = BoundBlock(block, bp.weights[start:stop],
                                                 bp.biases[start:stop], block_routes(block),
                                                 bp.group, bp.shapes[start:stop])
        return parts[(k, start, stop)]

    def _work(self, rows: int, cols: int, like: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """A reusable (rows, cols) work matrix of ``like``'s dtype and device: kept across
        steps, not state (``slot``: several live matrices of one shape)."""
        pool = self.__dict__.setdefault("_work_pool", {})
        key = (rows, cols, like.dtype, like.device, slot)
        if key not in pool:
            pool[key] = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
        return pool[key]

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then the new parameters are bound: G-SGD where they make
        whole G-blocks of the model, plain SGD otherwise. A G-block split over groups raises
        ValueError and leaves the optimizer as it was."""
        super().add_param_group(param_group)
        if "_named" not in self.__dict__:  # called by torch.optim.Optimizer.__init__
            return
        try:
            check_hyper_parameters(self._owner, self.param_groups[-1])
            self._bind()
        except (ValueError, StructureError):
            self.param_groups.pop()
            self._bind()
            raise

    def __getstate__(self) -> dict:
        """torch's state (defaults, state, param_groups) plus what rebinding needs, so that
        copy.deepcopy and pickle give an optimizer that steps like this one."""
        state = super().__getstate__()
        state.update(structure=self.structure, _owner=self._owner, _named=self._named)
        return state

    def __setstate__(self, state: dict) -> None:
        copied = "_blocks" not in self.__dict__  # a copy or an unpickled optimizer; torch's
        super().__setstate__(state)              # load_state_dict calls this on a live one
        if copied:
            self._bind()

    def summary(self) -> str:
        """The G-structure this optimizer works on, and the parameters left to plain SGD."""
        return self.structure.summary()
