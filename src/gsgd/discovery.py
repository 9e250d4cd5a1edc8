"""Structure discovery: find the positively scalable chains (G-blocks) of an ``nn.Module``.

The model is traced with torch.fx, so functional calls inside ``forward`` (``F.relu``,
``torch.flatten``, ``x.view(n, -1)``, residual ``x + f(x)``) are seen. Where tracing fails (data
dependent control flow) an ``nn.Sequential`` is walked as a plain list of its leaf modules.

Two layers (Linear or Conv2d) are joined when the output of the first reaches the second only
through positively homogeneous, unit-wise maps (ReLU family, identity, dropout, max / average
pooling, flatten) and is used nowhere else. Anything else ends the chain there; the reason is
recorded in ``Structure.notes`` (or raised, with ``strict=True``) naming the module path.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from gsgd.structure import Block, Layer, Structure, StructureError, layer_from_module

LAYER_TYPES = (nn.Linear, nn.Conv2d)

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


@dataclass
class _Op:
    """One graph node reduced to what discovery needs."""

    name: str  # module path, or the fx node name for functions
    kind: str  # "layer", "homogeneous", "other", "input", "output"
    module: nn.Module | None = None
    flatten: bool = False
    users: list[_Op] = field(default_factory=list)
    first_input: _Op | None = None
    description: str = ""


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(root.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"{name}() at {node.name}"
    if node.op == "call_method":
        return f".{node.target}() at {node.name}"
    return node.name


def _classify(node: fx.Node, root: nn.Module) -> tuple[str, nn.Module | None, bool]:
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        if isinstance(module, LAYER_TYPES):
            return "layer", module, False
        if isinstance(module, HOMOGENEOUS_MODULES):
            return "homogeneous", module, type(module) in FLATTENS
        return "other", module, False
    if node.op == "call_function":
        if node.target in HOMOGENEOUS_FUNCTIONS:
            return "homogeneous", None, node.target in FLATTENS
        if node.target is operator.getitem:
            return "other", None, False
        return "other", None, False
    if node.op == "call_method":
        if node.target in HOMOGENEOUS_METHODS:
            return "homogeneous", None, node.target in FLATTENS
        return "other", None, False
    if node.op == "placeholder":
        return "input", None, False
    if node.op == "output":
        return "output", None, False
    return "other", None, False


def _ops_from_graph(graph: fx.Graph, root: nn.Module) -> list[_Op]:
    ops: dict[fx.Node, _Op] = {}
    for node in graph.nodes:
        kind, module, flat = _classify(node, root)
        name = node.target if node.op == "call_module" else node.name
        ops[node] = _Op(str(name), kind, module, flat, description=_describe(node, root))
    for node, op in ops.items():
        op.users = [ops[u] for u in node.users]
        tensor_args = [a for a in node.all_input_nodes]
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
            "with explicit blocks"
        ) from exc
    return _ops_from_graph(graph, model)


def _next_layer(op: _Op) -> tuple[_Op | None, bool, str]:
    """Follow op's output through homogeneous maps; return (next layer, saw flatten, reason)."""
    cur, flattened = op, False
    while True:
        if len(cur.users) != 1:
            where = "the network output" if not cur.users else f"{len(cur.users)} places"
            return None, flattened, f"output of {cur.description} goes to {where}"
        user = cur.users[0]
        if user.first_input is not cur:
            return None, flattened, f"{user.description} does not take {cur.description} as input"
        if user.kind == "layer":
            return user, flattened, ""
        if user.kind != "homogeneous":
            if user.kind == "output":
                return None, flattened, ""
            return None, flattened, f"{user.description} is not positively homogeneous"
        flattened = flattened or user.flatten
        cur = user


def discover(model: nn.Module, strict: bool = False) -> Structure:
    """Find the G-blocks of ``model``: maximal chains of >= 2 layers joined by homogeneous maps.

    Parameters not in any block are listed in ``Structure.plain``; why each chain ended is in
    ``Structure.notes``. With ``strict=True`` a chain broken by a non-homogeneous map (as opposed
    to the network's output) raises :class:`StructureError` naming the module instead.
    """
    if not isinstance(model, nn.Module):
        raise StructureError(f"discover() needs an nn.Module, got {type(model).__name__}")
    ops = _trace(model)
    notes: list[str] = []
    layer_ops = [op for op in ops if op.kind == "layer"]

    # Modules called twice or parameters shared between modules cannot be rescaled per unit.
    calls: dict[str, int] = {}
    for op in layer_ops:
        calls[op.name] = calls.get(op.name, 0) + 1
    owners: dict[int, set[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(mname)
    excluded: set[str] = set()
    for op in layer_ops:
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

    nxt: dict[int, tuple[_Op, bool]] = {}
    has_prev: set[int] = set()
    for op in layer_ops:
        if op.name in excluded:
            continue
        follower, flattened, reason = _next_layer(op)
        if follower is not None and follower.name in excluded:
            reason, follower = f"{follower.name} is left to plain SGD", None
        if follower is not None:
            ok, why = _compatible(op, follower, flattened)
            if not ok:
                reason, follower = why, None
        if follower is None:
            if reason:
                if strict and "goes to the network output" not in reason:
                    raise StructureError(f"chain ends after {op.name}: {reason}")
                notes.append(f"chain ends after {op.name}: {reason}")
            continue
        nxt[id(op)] = (follower, flattened)
        has_prev.add(id(follower))

    blocks: list[Block] = []
    for op in layer_ops:
        if op.name in excluded or id(op) in has_prev or id(op) not in nxt:
            continue
        layers = [layer_from_module(op.name, op.module)]
        cur = op
        while id(cur) in nxt:
            cur, flattened = nxt[id(cur)]
            in_units = layers[-1].out_units if flattened or isinstance(cur.module, nn.Linear) \
                else None
            layers.append(layer_from_module(cur.name, cur.module, in_units=in_units))
        blocks.append(Block(tuple(layers)))

    in_blocks = {n for b in blocks for n in b.param_names}
    plain = tuple(n for n, p in model.named_parameters()
                  if n not in in_blocks and p.requires_grad)
    return Structure(tuple(blocks), plain, tuple(notes))


def _compatible(op: _Op, follower: _Op, flattened: bool) -> tuple[bool, str]:
    """Can ``follower`` read ``op``'s units as its input units?"""
    a, b = op.module, follower.module
    if isinstance(a, nn.Conv2d) and isinstance(b, nn.Linear) and not flattened:
        return False, f"{follower.name} (Linear) reads the conv output of {op.name} without flatten"
    if isinstance(a, nn.Linear) and isinstance(b, nn.Conv2d):
        return False, f"{follower.name} (Conv2d) reads the Linear output of {op.name}"
    out_units = a.out_features if isinstance(a, nn.Linear) else a.out_channels
    in_features = b.in_features if isinstance(b, nn.Linear) else b.in_channels
    if in_features % out_units:
        return False, (f"{follower.name} has {in_features} inputs, not a multiple of the "
                       f"{out_units} units of {op.name}")
    if isinstance(b, nn.Conv2d) and in_features != out_units:
        return False, f"{follower.name} does not read the {out_units} channels of {op.name}"
    return True, ""


def blocks_from_layers(model: nn.Module, chains: list[list[str]]) -> Structure:
    """Build a Structure from explicit chains of module paths (the user's own G-blocks)."""
    modules = dict(model.named_modules())
    blocks = []
    for chain in chains:
        layers: list[Layer] = []
        for path in chain:
            if path not in modules:
                raise StructureError(f"no module named {path!r} in {type(model).__name__}")
            module = modules[path]
            in_units = layers[-1].out_units if layers and isinstance(module, nn.Linear) else None
            layers.append(layer_from_module(path, module, in_units=in_units))
        blocks.append(Block(tuple(layers)))
    in_blocks = {n for b in blocks for n in b.param_names}
    seen: set[str] = set()
    for n in in_blocks:
        if n in seen:
            raise StructureError(f"parameter {n} appears in two blocks")
        seen.add(n)
    plain = tuple(n for n, p in model.named_parameters() if n not in in_blocks and p.requires_grad)
    return Structure(tuple(blocks), plain)
