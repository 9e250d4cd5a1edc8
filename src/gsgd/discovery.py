"""Structure discovery: find the positively scalable chains (G-blocks) of an ``nn.Module``.

The model is traced with torch.fx, so functional calls inside ``forward`` (``F.relu``,
``torch.flatten``, ``x.view(x.size(0), -1)``, ``x.mean((2, 3))``, residual ``x + f(x)``) are
seen. Where tracing fails (data dependent control flow) an ``nn.Sequential`` is walked as a plain
list of its leaf modules.

Two layers (Linear or Conv2d; with ``batchnorm="exact"`` also a batch norm's affine pair) are
joined when the output of the first reaches the second only through positively homogeneous,
unit-wise maps (ReLU family, identity, dropout, max / average pooling, global average pooling,
flatten) and is used nowhere else (docs/math.md section 8). Anything else ends the chain there
(a residual add ends it naturally: one block per residual branch); the reason is recorded in
``Structure.notes`` (or raised, with ``strict=True``) naming the module path.

Batch norm (``batchnorm=``; a model with batch norm and no choice raises :class:`StructureError`):

- ``"exact"``: BN's affine pair (gamma_c, beta_c) is the positively scalable incoming edge of
  channel c, so the G-block is [BN affine of layer k, layer k+1, ...]: a layer with
  ``in_units=1, taps=1`` and kind ``"bn-affine"``. The layer before BN is scale-free (BN divides
  its scale out) and gets plain SGD. Invariance under G is exact.
- ``"approximate"``: the paper's heuristic. BN is treated as transparent, chains run
  conv -> BN -> ReLU -> conv as without BN, and the G-space direction of every BN-followed layer
  is scaled per output filter by that filter's weight norm (``Layer.approx_bn``). BN's gamma /
  beta get plain SGD. Labelled approximate: with BN the rescaling group of the chain is no
  symmetry of the network, so this is NOT invariant.

Cuts (``cut=``): ``"stages"`` cuts every chain before each strided conv and before a Linear that
reads conv features (the paper's one block per PlainNet stage; the stem joins stage 1, the
classifier is left alone); a collection of module paths cuts before those layers. Pieces with one
layer have no hidden units and are left to plain SGD.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from gsgd.structure import Block, Layer, Structure, StructureError, layer_from_module

LAYER_TYPES = (nn.Linear, nn.Conv2d)
BATCHNORM_OPTIONS = ("exact", "approximate", None)

# Positively homogeneous, unit-wise maps: f(c x) = c f(x) for c > 0, channel by channel.
HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.AlphaDropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Flatten,
)
HOMOGENEOUS_FUNCTIONS = {
    F.relu, torch.relu, F.leaky_relu, F.prelu, F.dropout, F.dropout1d, F.dropout2d,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten,
    torch.relu_, F.relu_,
}
HOMOGENEOUS_METHODS = {"relu", "relu_", "flatten", "view", "reshape", "contiguous"}
FLATTENS = {nn.Flatten, torch.flatten, "flatten", "view", "reshape"}
# Reductions that are homogeneous when they act on spatial dimensions only (global pooling).
SPATIAL_REDUCTIONS = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax", "squeeze"}
SHAPE_METHODS = {"size", "dim", "numel"}
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
BATCHNORM_FUNCTIONS = {F.batch_norm, torch.batch_norm}


@dataclass
class _Op:
    """One graph node reduced to what discovery needs."""

    name: str  # module path, or the fx node name for functions
    kind: str  # "layer", "homogeneous", "bn", "other", "input", "output"
    module: nn.Module | None = None
    flatten: bool = False
    users: list[_Op] = field(default_factory=list)
    first_input: _Op | None = None
    description: str = ""
    target: object = None


@dataclass(frozen=True)
class _Link:
    """How a layer reaches the next one."""

    follower: _Op | None
    flattened: bool = False
    saw_bn: bool = False
    reason: str = ""
    hard: bool = False  # a non-homogeneous map (strict mode raises), not a natural boundary


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(root.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"{name}() at {node.name}"
    if node.op == "call_method":
        return f".{node.target}() at {node.name}"
    return node.name


def _is_shape_query(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """True for ``x.size()``, ``x.shape``, ``x.dim()`` and plain arithmetic on them only."""
    if node in memo:
        return memo[node]
    result = False
    if node.op == "call_method" and node.target in SHAPE_METHODS:
        result = True
    elif node.op == "call_function" and node.target is getattr:
        result = len(node.args) > 1 and node.args[1] in SHAPE_ATTRIBUTES
    elif node.op in ("call_function", "call_method") and node.all_input_nodes:
        result = all(_is_shape_query(a, memo) for a in node.all_input_nodes)
    memo[node] = result
    return result


def _reduction_dims(node: fx.Node) -> tuple | None:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(dims, int):
        return (dims,)
    if isinstance(dims, tuple | list) and dims and all(isinstance(d, int) for d in dims):
        return tuple(dims)
    return None


def _spatial_reduction(node: fx.Node) -> tuple[bool, bool]:
    """(is a per-channel reduction over spatial dims only, its output is (N, C))."""
    dims = _reduction_dims(node)
    if dims is None or not all(d >= 2 or d in (-1, -2) for d in dims):
        return False, False
    keepdim = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
    if node.target == "squeeze":
        keepdim = False
    return True, not keepdim and (len(set(dims)) == 2 or node.target == "squeeze")


def _classify(node: fx.Node, root: nn.Module) -> tuple[str, nn.Module | None, bool]:
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        if isinstance(module, LAYER_TYPES):
            return "layer", module, False
        if isinstance(module, _BatchNorm):
            return "bn", module, False
        if isinstance(module, HOMOGENEOUS_MODULES):
            return "homogeneous", module, type(module) in FLATTENS
        return "other", module, False
    if node.op in ("call_function", "call_method"):
        target = node.target
        if node.op == "call_function" and target in BATCHNORM_FUNCTIONS:
            return "bn-functional", None, False
        if target in SPATIAL_REDUCTIONS:
            ok, flat = _spatial_reduction(node)
            return ("homogeneous", None, flat) if ok else ("other", None, False)
        if (node.op == "call_function" and target in HOMOGENEOUS_FUNCTIONS) or \
                (node.op == "call_method" and target in HOMOGENEOUS_METHODS):
            return "homogeneous", None, target in FLATTENS
        return "other", None, False
    if node.op == "placeholder":
        return "input", None, False
    if node.op == "output":
        return "output", None, False
    return "other", None, False


def _ops_from_graph(graph: fx.Graph, root: nn.Module) -> list[_Op]:
    memo: dict[fx.Node, bool] = {}
    ops: dict[fx.Node, _Op] = {}
    for node in graph.nodes:
        if _is_shape_query(node, memo):
            continue  # shape queries carry no values: they neither use nor feed a chain
        kind, module, flat = _classify(node, root)
        name = node.target if node.op == "call_module" else node.name
        ops[node] = _Op(str(name), kind, module, flat, description=_describe(node, root),
                        target=node.target)
    for node, op in ops.items():
        op.users = [ops[u] for u in node.users if u in ops]
        tensor_args = [a for a in node.all_input_nodes if a in ops]
        op.first_input = ops[tensor_args[0]] if tensor_args else None
        if node.op in ("call_function", "call_method") and op.kind == "homogeneous":
            # a homogeneous op must act on one tensor only (e.g. not a prelu weight from get_attr)
            extra = [a for a in tensor_args[1:] if a.op != "get_attr"]
            if extra:
                op.kind = "other"
    return list(ops.values())


def _sequential_leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    leaves = []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            leaves.extend(_sequential_leaves(child, path + "."))
        else:
            leaves.append((path, child))
    return leaves


def _ops_from_sequential(model: nn.Sequential) -> list[_Op]:
    graph = fx.Graph()
    x = graph.placeholder("x")
    for path, _ in _sequential_leaves(model):
        x = graph.call_module(path, (x,))
    graph.output(x)
    return _ops_from_graph(graph, model)


def _trace(model: nn.Module) -> list[_Op]:
    try:
        graph = fx.Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds of errors on untraceable code
        if isinstance(model, nn.Sequential):
            return _ops_from_sequential(model)
        raise StructureError(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "make forward traceable, use nn.Sequential, or pass structure=gsgd.Structure(...) "
            "with explicit blocks (gsgd.discovery.blocks_from_layers)"
        ) from exc
    return _ops_from_graph(graph, model)


def _next_layer(op: _Op, bn_transparent: bool) -> _Link:
    """Follow op's output through homogeneous maps (and BN if transparent) to the next layer."""
    cur, flattened, saw_bn = op, False, False
    while True:
        if len(cur.users) != 1:
            where = "the network output" if not cur.users else f"{len(cur.users)} places"
            return _Link(None, flattened, saw_bn, f"output of {cur.description} goes to {where}")
        user = cur.users[0]
        if user.first_input is not cur:
            return _Link(None, flattened, saw_bn,
                         f"{user.description} does not take {cur.description} as input")
        if user.kind in ("layer", "bn") and not (user.kind == "bn" and bn_transparent):
            return _Link(user, flattened, saw_bn)
        if user.kind == "output":
            return _Link(None, flattened, saw_bn)
        if user.kind == "bn":  # approximate mode: BN passes, its preceding layer is flagged
            saw_bn = True
        elif user.kind != "homogeneous":
            merge = user.target in (operator.add, operator.iadd, torch.add, torch.cat, "add")
            what = "a residual merge" if merge else "not positively homogeneous"
            return _Link(None, flattened, saw_bn, f"{user.description} is {what}",
                         hard=not merge and user.kind != "bn-functional")
        flattened = flattened or user.flatten
        cur = user


def _units(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return module.num_features  # batch norm


def _spatial(module: nn.Module) -> bool:
    """Does the module produce (N, C, H, W) maps (conv, BatchNorm2d) rather than (N, F)?"""
    return isinstance(module, nn.Conv2d | nn.BatchNorm2d)


def _compatible(op: _Op, follower: _Op, flattened: bool) -> tuple[bool, str]:
    """Can ``follower`` read ``op``'s units as its input units?"""
    a, b = op.module, follower.module
    if isinstance(b, _BatchNorm):
        return False, (f"{follower.name} (batch norm) normalises it: its incoming weights are "
                       "scale-free and get plain SGD")
    units = _units(a)
    if isinstance(b, nn.Conv2d):
        if not _spatial(a) or flattened:
            return False, f"{follower.name} (Conv2d) reads the flat output of {op.name}"
        if b.in_channels != units:
            return False, f"{follower.name} does not read the {units} channels of {op.name}"
        return True, ""
    if _spatial(a) and not flattened:
        return False, f"{follower.name} (Linear) reads the conv output of {op.name} without flatten"
    if b.in_features % units or (not _spatial(a) and b.in_features != units):
        return False, (f"{follower.name} has {b.in_features} inputs, not a multiple of the "
                       f"{units} units of {op.name}")
    return True, ""


def _starts_stage(op: _Op, prev: _Op) -> bool:
    """cut="stages": a strided conv, or a Linear reading conv features (the classifier)."""
    m = op.module
    if isinstance(m, nn.Conv2d):
        return any(s > 1 for s in m.stride)
    return isinstance(m, nn.Linear) and _spatial(prev.module)


def _check_batchnorm_option(ops: list[_Op], batchnorm: str | None) -> None:
    if batchnorm not in BATCHNORM_OPTIONS:
        raise ValueError(f"discover: batchnorm={batchnorm!r} is not supported; "
                         f"choose one of {BATCHNORM_OPTIONS}")
    found = [op.name for op in ops if op.kind in ("bn", "bn-functional")]
    if found and batchnorm is None:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise StructureError(
            f"the model has batch norm ({shown}); G-SGD needs you to choose how to treat it: "
            "batchnorm='exact' (G-blocks [BN affine of layer k, layer k+1]; the layer before BN "
            "is scale-free and gets plain SGD; exactly invariant) or batchnorm='approximate' "
            "(the paper's heuristic: chains run through BN and G-space gradients are scaled by "
            "per-filter weight norms; NOT invariant). Pass it to discover(model, batchnorm=...) "
            "or GSGD(model, ..., batchnorm=...)"
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside the usual wrappers: ``torch.compile`` (``_orig_mod``),
    DistributedDataParallel and DataParallel (``module``), nested in any order. The wrapped
    model holds the same Parameter objects, so an optimizer built on it trains the wrapper."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def discover(model: nn.Module, strict: bool = False, *, batchnorm: str | None = None,
             cut: str | Collection[str] | None = None) -> Structure:
    """Find the G-blocks of ``model``: maximal chains of >= 2 layers joined by homogeneous maps.

    Parameters not in any block are listed in ``Structure.plain``; why each chain ended is in
    ``Structure.notes``. With ``strict=True`` a chain broken by a non-homogeneous map (as opposed
    to the network's output, a fan-out, a residual merge or batch norm) raises
    :class:`StructureError` naming the module instead.

    ``batchnorm``: ``"exact"``, ``"approximate"`` or None (then a model with batch norm raises);
    see the module docstring. ``cut``: None (maximal chains), ``"stages"`` or module paths to cut
    before.
    """
    if not isinstance(model, nn.Module):
        raise StructureError(f"discover() needs an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    ops = _trace(model)
    _check_batchnorm_option(ops, batchnorm)
    cut_before = _cut_names(model, cut)
    notes: list[str] = []
    if batchnorm == "approximate":
        notes.append("batchnorm='approximate': the paper's heuristic (G-space gradients of "
                     "BN-followed layers scaled by per-filter weight norms); NOT invariant")
    bn_transparent = batchnorm == "approximate"
    for op in ops:
        if op.kind == "other" and op.module is not None \
                and next(op.module.parameters(), None) is not None:
            notes.append(f"{op.name} ({type(op.module).__name__}) is opaque to discovery (traced "
                         "as one module): its parameters get plain SGD")
    for op in ops:
        if op.kind == "bn-functional":
            op.kind = "other"
            notes.append(f"{op.description}: functional batch norm is not supported; "
                         "it ends the chain (use nn.BatchNorm2d)")
        elif op.kind == "bn" and not bn_transparent and not op.module.affine:
            op.kind = "other"
            notes.append(f"{op.name}: batch norm without affine parameters: its channels "
                         "have no scalable incoming edge; it ends the chain")
    layer_ops = [op for op in ops if op.kind in ("layer", "bn")
                 and not (op.kind == "bn" and bn_transparent)]
    excluded = _excluded_layers(model, layer_ops, notes)

    links: dict[int, tuple[_Op, bool]] = {}
    has_prev: set[int] = set()
    approx: set[int] = set()
    for op in layer_ops:
        if op.name in excluded:
            continue
        link = _next_layer(op, bn_transparent)
        follower, reason = link.follower, link.reason
        if link.saw_bn and isinstance(op.module, LAYER_TYPES):
            approx.add(id(op))
        if follower is not None and follower.name in excluded:
            reason, follower = f"{follower.name} is left to plain SGD", None
        if follower is not None:
            ok, why = _compatible(op, follower, link.flattened)
            if not ok:
                reason, follower = why, None
        if follower is None:
            if reason:
                if strict and link.hard:
                    raise StructureError(f"chain ends after {op.name}: {reason}")
                notes.append(f"chain ends after {op.name}: {reason}")
            continue
        links[id(op)] = (follower, link.flattened)
        has_prev.add(id(follower))

    blocks: list[Block] = []
    for op in layer_ops:
        if op.name in excluded or id(op) in has_prev or id(op) not in links:
            continue
        chain: list[tuple[_Op, bool]] = [(op, False)]
        while id(chain[-1][0]) in links:
            chain.append(links[id(chain[-1][0])])
        for piece in _cut_chain(chain, cut, cut_before, notes):
            blocks.append(_block(piece, approx))

    in_blocks = {n for b in blocks for n in b.param_names}
    plain = tuple(n for n, p in model.named_parameters()
                  if n not in in_blocks and p.requires_grad)
    return Structure(tuple(blocks), plain, tuple(notes))


def _excluded_layers(model: nn.Module, layer_ops: list[_Op], notes: list[str]) -> set[str]:
    """Layers that cannot be rescaled per unit: called twice, shared parameters, grouped convs."""
    calls: dict[str, int] = {}
    for op in layer_ops:
        calls[op.name] = calls.get(op.name, 0) + 1
    owners: dict[int, set[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(mname)
    excluded: set[str] = set()
    for op in layer_ops:
        if op.name in excluded:
            continue  # a module called several times: one note, not one per call
        shared = any(len(owners.get(id(p), ())) > 1 for p in op.module.parameters(recurse=False))
        reason = ""
        if calls[op.name] > 1:
            reason = f"{op.name}: module is called {calls[op.name]} times (shared parameters)"
        elif shared:
            reason = f"{op.name}: its parameters are shared with another module"
        elif isinstance(op.module, nn.Conv2d) and op.module.groups != 1:
            reason = (f"{op.name}: Conv2d with groups={op.module.groups} "
                      "(only groups=1 is supported)")
        if reason:
            excluded.add(op.name)
            notes.append(reason + "; left to plain SGD")
    return excluded


def _cut_names(model: nn.Module, cut: str | Collection[str] | None) -> set[str]:
    if cut is None or cut == "stages":
        return set()
    if isinstance(cut, str) or not isinstance(cut, Iterable):
        raise ValueError(f"discover: cut={cut!r} is not supported; use None, 'stages' or a "
                         "collection of module paths to cut before")
    names = set(cut)
    known = dict(model.named_modules())
    unknown = sorted(n for n in names if n not in known)
    if unknown:
        raise StructureError(f"discover: cut names {unknown} are not modules of "
                             f"{type(model).__name__}")
    return names


def _cut_chain(chain: list[tuple[_Op, bool]], cut, cut_before: set[str],
               notes: list[str]) -> list[list[tuple[_Op, bool]]]:
    """Split a chain before the cut layers; pieces of one layer are dropped (plain SGD)."""
    pieces: list[list[tuple[_Op, bool]]] = [[chain[0]]]
    for k in range(1, len(chain)):
        op = chain[k][0]
        if op.name in cut_before or (cut == "stages" and _starts_stage(op, chain[k - 1][0])):
            pieces.append([(op, False)])
        else:
            pieces[-1].append(chain[k])
    for piece in pieces:
        if len(piece) < 2 and len(chain) > 1:
            notes.append(f"{piece[0][0].name}: alone after cutting the chain; plain SGD")
    return [p for p in pieces if len(p) >= 2]


def _block(piece: list[tuple[_Op, bool]], approx: set[int]) -> Block:
    layers: list[Layer] = []
    for k, (op, flattened) in enumerate(piece):
        in_units = None
        if k and (flattened or isinstance(op.module, nn.Linear)):
            in_units = layers[-1].out_units
        layer = layer_from_module(op.name, op.module, in_units=in_units)
        if id(op) in approx:
            layer = replace(layer, approx_bn=True)
        layers.append(layer)
    return Block(tuple(layers))


def blocks_from_layers(model: nn.Module, chains: list[list[str]],
                       approximate_bn: Collection[str] = ()) -> Structure:
    """Build a Structure from explicit chains of module paths (the user's own G-blocks).

    A chain may hold Linear, Conv2d and batch norm modules (a BN module stands for its affine
    pair, kind ``"bn-affine"``). Layers named in ``approximate_bn`` get the paper's approximate
    BN heuristic (``Layer.approx_bn``). Consecutive layers must share their units.
    """
    modules = dict(model.named_modules())
    flags = set(approximate_bn)
    blocks = []
    for chain in chains:
        layers: list[Layer] = []
        for path in chain:
            if path not in modules:
                raise StructureError(f"no module named {path!r} in {type(model).__name__}")
            module = modules[path]
            in_units = layers[-1].out_units if layers and isinstance(module, nn.Linear) else None
            layer = layer_from_module(path, module, in_units=in_units)
            layers.append(replace(layer, approx_bn=True) if path in flags else layer)
        blocks.append(Block(tuple(layers)))
    seen: set[str] = set()
    for b in blocks:
        for n in b.param_names:
            if n in seen:
                raise StructureError(f"parameter {n} appears in two blocks")
            seen.add(n)
    notes = ("explicit approximate BN layers: NOT invariant",) if flags else ()
    plain = tuple(n for n, p in model.named_parameters() if n not in seen and p.requires_grad)
    return Structure(tuple(blocks), plain, notes)
