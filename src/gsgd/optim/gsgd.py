"""GSGD: SGD in the positively scale-invariant space of a ReLU network, as a torch optimizer."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from gsgd import fused
from gsgd.basis import LayerIndex, block_index
from gsgd.fused import (
    Meta,
    Plan,
    StepFlags,
    block_apply_eager,
    block_meta,
    block_plan,
    compiled_block_apply,
    compiled_block_plan,
    compiled_step,
    hyper_tensor,
)
from gsgd.optim.common import (
    GBlockOptimizer,
    NonFiniteError,
    plain_sgd_update,
)
from gsgd.structure import Block, Structure, layer_view


@dataclass
class _BlockParams:
    block: Block
    weights: list[nn.Parameter]
    biases: list[nn.Parameter | None]
    index_cpu: tuple[LayerIndex, ...]
    index_cache: dict[torch.device, tuple[LayerIndex, ...]]

    meta: Meta
    largest: int  # weights of its largest layer
    views_key: tuple = ()
    views: list[torch.Tensor] | None = None
    cache: dict = field(default_factory=dict)

    @property
    def approx_bn(self) -> bool:
        return any(layer.approx_bn for layer in self.block.layers)

    def cached(self, name: str, sources: list, make: Callable[[], object],
               by_value: bool = False) -> object:
        """``make()``, reused while ``sources`` are the same objects (weakly referenced, so a
        cache never keeps a freed gradient alive) or, ``by_value``, equal values."""
        entry = self.cache.get(name)
        if entry is not None:
            refs, value = entry
            if by_value:
                if refs == sources:
                    return value
            elif len(refs) == len(sources) and all(
                    (r is None and s is None) or (r is not None and r() is s)
                    for r, s in zip(refs, sources, strict=True)):
                return value
        value = make()
        refs = list(sources) if by_value else [None if t is None else weakref.ref(t)
                                               for t in sources]
        self.cache[name] = (refs, value)
        return value

    def index(self, device: torch.device) -> tuple[LayerIndex, ...]:
        if device not in self.index_cache:
            self.index_cache[device] = tuple(ix.to(device) for ix in self.index_cpu)
        return self.index_cache[device]

    def weight_views(self) -> list[torch.Tensor]:
        """``(out, in, taps)`` views of the weights, rebuilt only if a parameter's storage moved."""
        key = tuple((w.data_ptr(), w.device, w.dtype) for w in self.weights)
        if self.views is None or key != self.views_key:
            self.views = [layer_view(w.detach(), layer) for layer, w in
                          zip(self.block.layers, self.weights, strict=True)]
            self.views_key = key
        return self.views


@dataclass
class _Step:
    """One block's tensors for this step and its phase-A plan (see gsgd.fused)."""

    ws: list[torch.Tensor]
    gs: list[torch.Tensor]
    bs: list[torch.Tensor | None]
    gbs: list[torch.Tensor | None]
    bufs: list[torch.Tensor | None]
    bias_bufs: list[torch.Tensor | None]
    hp: torch.Tensor
    flags: StepFlags
    row_scales: list[torch.Tensor | None] | None
    first: bool
    plan: Plan | None = None
    clipped: torch.Tensor | int = 0


class _CompileFailed(RuntimeError):
    """torch.compile could not build the step; GSGD falls back to the eager step."""


class GSGD(GBlockOptimizer):
    r"""G-SGD (Meng et al., ICLR 2019): SGD on the basis-path values of every G-block.

    For each G-block (a positively scalable chain found by :func:`gsgd.discover`):

    .. code-block:: text

        x_e = w_e * g_e                                 (g = dL/dw from ordinary backprop)
        d_e = dL/dv_e  by the inverse chain rule        (gsgd.functional.g_space_gradient)
        d_e += weight_decay * v_e                       (L2 on basis-path values)
        buf = momentum * buf + (1 - dampening) * d      (heavy ball, in G-space)
        s   = d + momentum * buf if nesterov else buf
        v'  = v - lr * s   -> new weights by weight allocation, frozen edges unchanged

    Every step is invariant under the rescaling group G: two networks related by a positive
    rescaling of hidden units stay related by it. Parameters outside every G-block get plain SGD
    with the same hyper-parameters (see :attr:`plain_parameters`).

    Args:
        params: an ``nn.Module`` (the common case: its structure is discovered), or parameters /
            param groups together with ``model=`` (or ``structure=``).
        lr: learning rate (in G-space).
        momentum, dampening, nesterov: as in ``torch.optim.SGD``, applied to dL/dv.
        weight_decay: L2 penalty on basis-path values (lambda/2 * v^2).
        max_ratio: bound B on the carrier ratios R = v'/v, clamped to [1/B, B]. A ratio at or
            below 0 would flip a designated route's sign and at 0 kill it; every clipped entry is
            counted (:meth:`clip_counts`).
        on_nonfinite: ``"raise"`` (default) raises :class:`NonFiniteError` naming the parameter
            when a gradient, weight or designated route is non-finite or zero; ``"skip"`` skips
            the whole step instead and counts it in ``param_groups[i]["skipped_steps"]``.
        compile: build the step with ``torch.compile`` (lazily, on the first step: seconds to
            tens of seconds once per process and shape). Each layer's update becomes one kernel
            reading w, g, buf and writing w, buf, and the O(H) work a few kernels: the fast path
            (about 1.6x a torch SGD step on a 784-1000x3-10 MLP on CPU, against 3x eagerly).
            Networks whose G-block layers are small (< ``gsgd.fused.SMALL_LAYER`` weights)
            take ONE single-threaded graph per step, larger ones two graphs per block. Same
            result as the eager path to rounding; if compiling fails (no C++ compiler, say) it
            warns and takes the eager step.
        model, structure: where the G-blocks come from when ``params`` is not a module.
        batchnorm: for models with batch norm, passed to :func:`gsgd.discover`: ``"exact"``
            (G-blocks [BN affine, next layer]; invariant) or ``"approximate"`` (the paper's
            heuristic: G-space directions of BN-followed layers scaled by per-filter weight
            norms; NOT invariant). A model with batch norm and no choice raises.
    """

    def __init__(
        self,
        params: nn.Module | Iterable,
        lr: float = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        max_ratio: float = 100.0,
        on_nonfinite: str = "raise",
        compile: bool = False,
        *,
        model: nn.Module | None = None,
        structure: Structure | None = None,
        batchnorm: str | None = None,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, max_ratio=max_ratio,
                        on_nonfinite=on_nonfinite, compile=compile, skipped_steps=0)
        bound = self._setup("GSGD", params, defaults, model, structure, batchnorm)
        self._blocks = []
        for block, weights, biases, _ in bound:
            index = block_index(block)
            self._blocks.append(_BlockParams(block, weights, biases, index, {}, block_meta(index),
                                             max(w.numel() for w in weights)))
        self._block_group = [gi for *_, gi in bound]

    def clip_counts(self) -> list[int]:
        """Per G-block: how many carrier ratios R have been clipped so far."""
        return [int(self.state[b.weights[0]].get("clipped", 0)) for b in self._blocks]

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """Perform one G-SGD step (and plain SGD on parameters outside the G-blocks)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            taken = self._block_step()
        except _CompileFailed as exc:
            warnings.warn(f"GSGD(compile=True): torch.compile failed ({exc}); falling back to "
                          "the eager step (compile=False)", RuntimeWarning, stacklevel=2)
            for group in self.param_groups:
                group["compile"] = False
            taken = self._block_step()
        if not taken:
            return loss
        if self._plain:
            plain_ids = {id(p) for p in self._plain}
            for group in self.param_groups:
                params = [p for p in group["params"] if id(p) in plain_ids and p.grad is not None]
                for p in params:
                    if p.grad.is_sparse:
                        raise ValueError(f"GSGD: sparse gradient for {self._names.get(id(p))}")
                plain_sgd_update(self, params, group)
        return loss

    def _block_step(self) -> bool:
        """The G-SGD step of every block; False if it was refused (non-finite, skip mode)."""
        steps = []
        for bp, gi in zip(self._blocks, self._block_group, strict=True):
            group = self.param_groups[gi]
            st = self._gather(bp, group)
            if st is not None:
                steps.append((bp, group, st))
        compiled = [(bp, st) for bp, group, st in steps if group["compile"]]
        one_graph = bool(compiled) and max(bp.largest for bp, _ in compiled) < fused.SMALL_LAYER
        planned = [(bp, st, group["compile"]) for bp, group, st in steps
                   if not (one_graph and group["compile"])]
        all_steps = [(bp, st) for bp, _, st in steps]
        for bp, st, comp in planned:
            if comp:
                st.plan = self._compiled_call(all_steps, compiled_block_plan(), st.ws,
                                              st.gs, st.gbs, st.bufs, bp.meta, st.hp, st.flags,
                                              st.row_scales)
            else:
                st.plan = block_plan(st.ws, st.gs, st.gbs, st.bufs, bp.meta, st.hp, st.flags,
                                     st.row_scales, self._scratch_for(st.ws[0]))
            st.clipped = st.plan.clipped
        flags = [st.plan.ok for _, st, _ in planned]
        plain_grads = [p.grad for p in self._plain if p.grad is not None]
        if one_graph:
            # small blocks: ONE graph plans, checks and updates (writes only if all is finite)
            gate = torch.stack(flags).all() if flags else None
            blocks = [(st.ws, st.gs, st.bs, st.gbs, st.bufs, st.bias_bufs, bp.meta, st.hp,
                       st.flags, st.row_scales) for bp, st in compiled]
            ok, clipped = self._compiled_call(all_steps, compiled_step(), blocks,
                                              plain_grads, gate)
            for (_, st), n in zip(compiled, clipped, strict=True):
                st.clipped = n
        else:
            flags.extend(torch.isfinite(g.sum()) for g in plain_grads)
            ok = torch.stack(flags).all() if flags else None
        if ok is not None and not bool(ok):
            self._refuse(all_steps)
            return False
        for bp, st, comp in planned:
            args = (st.ws, st.gs, st.bs, st.gbs, st.bufs, st.bias_bufs, bp.meta, st.plan,
                    st.hp, st.flags, st.row_scales)
            if comp:
                self._compiled_call(all_steps, compiled_block_apply(), *args)
            else:
                block_apply_eager(*args, self._scratch_for(st.ws[0]))
        for bp, st in all_steps:
            state = self.state[bp.weights[0]]
            # a Python int: load_state_dict would cast a tensor counter to the parameter's dtype
            state["clipped"] = state.get("clipped", 0) + int(st.clipped)
        return True

    def _compiled_call(self, steps, fn: Callable, *args):
        """Call a compiled graph. Until one has run, a failure to compile (no C++ compiler,
        an unsupported backend) forgets this step's new buffers and raises _CompileFailed, so
        that the step is redone eagerly (nothing has been written: graphs compile first)."""
        if self.__dict__.get("_compile_works"):
            return fn(*args)
        try:
            out = fn(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            self._forget_new_buffers(steps)
            raise _CompileFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") \
                from exc
        self._compile_works = True
        return out

    def _forget_new_buffers(self, steps) -> None:
        """Drop momentum buffers made for a step that was not taken (they are not state)."""
        for bp, st in steps:
            if st.first:
                for p in (*bp.weights, *(b for b in bp.biases if b is not None)):
                    self.state[p].pop("momentum_buffer", None)

    def _gather(self, bp: _BlockParams, group: dict) -> _Step | None:
        """Views, gradients, momentum buffers and hyper-parameters of a block (None: no grad).
        Views are cached per block and rebuilt only when the tensors behind them change."""
        grads = [w.grad for w in bp.weights]
        if all(g is None for g in grads):
            return None
        ws = bp.weight_views()
        gs = bp.cached("grads", grads, lambda: self._grad_views(bp, grads, ws))
        bias_grads = [None if b is None else b.grad for b in bp.biases]
        gbs = bp.cached("bias grads", bias_grads, lambda: [
            None if b is None else (g if g is not None else torch.zeros_like(b))
            for b, g in zip(bp.biases, bias_grads, strict=True)])
        bufs: list[torch.Tensor | None] = [None] * len(ws)
        bias_bufs: list[torch.Tensor | None] = [None] * len(ws)
        first = False  # first momentum step: buffers are zero and dampening is not applied
        if group["momentum"]:
            first = "momentum_buffer" not in self.state[bp.weights[0]]
            params = (*bp.weights, *bp.biases)
            sources = [None if p is None else self._buffer(p) for p in params]
            views = bp.cached("buffers", sources, lambda: [
                None if t is None else t.view(like.shape)
                for t, like in zip(sources, (*ws, *bp.biases), strict=True)])
            bufs, bias_bufs = views[:len(ws)], views[len(ws):]
        values = (group["lr"], group["momentum"], 0.0 if first else group["dampening"],
                  group["weight_decay"], group["max_ratio"])
        hp = bp.cached("hyper-parameters", [*values, ws[0].dtype, ws[0].device],
                       lambda: hyper_tensor(*values, ws[0]), by_value=True)
        flags = StepFlags(bool(group["nesterov"]), bool(group["weight_decay"]))
        # batchnorm="approximate" (the paper's heuristic, NOT invariant): the G-space gradient
        # of every filter of a BN-followed layer is scaled by that filter's weight norm.
        row_scales = None
        if bp.approx_bn:
            row_scales = [w.reshape(w.shape[0], -1).norm(dim=1) if layer.approx_bn else None
                          for layer, w in zip(bp.block.layers, ws, strict=True)]
        return _Step(ws, gs, list(bp.biases), gbs, bufs, bias_bufs, hp, flags, row_scales,
                     first)

    @staticmethod
    def _grad_views(bp: _BlockParams, grads: list, ws: list[torch.Tensor]
                    ) -> list[torch.Tensor]:
        views = []
        for layer, g, w in zip(bp.block.layers, grads, ws, strict=True):
            if g is not None and g.is_sparse:
                raise ValueError(f"GSGD: sparse gradient for {layer.weight}")
            views.append(torch.zeros_like(w) if g is None else g.view(w.shape))
        return views

    def _refuse(self, steps) -> None:
        """A gradient, weight or designated route was non-finite (or a route zero): nothing was
        written; raise naming the first problem, or count a skipped step."""
        problem = self._find_problem(steps)
        self._forget_new_buffers(steps)
        if self.param_groups[0]["on_nonfinite"] == "skip":
            for group in self.param_groups:
                group["skipped_steps"] += 1
            return
        raise NonFiniteError(f"GSGD: {problem}; the step was not taken "
                             "(pass on_nonfinite='skip' to skip such steps)")

    def _find_problem(self, steps) -> str:
        """Name the first parameter with a non-finite value or a zero designated weight."""
        for bp, st in steps:
            ws, gs, bs, gbs, index = st.ws, st.gs, st.bs, st.gbs, bp.index(st.ws[0].device)
            for l, layer in enumerate(bp.block.layers):
                if not torch.isfinite(ws[l]).all():
                    return f"non-finite weight in {layer.weight}"
                if not torch.isfinite(gs[l]).all():
                    return f"non-finite gradient for {layer.weight}"
                if bs[l] is not None and not torch.isfinite(bs[l]).all():
                    return f"non-finite bias {layer.bias}"
                if gbs[l] is not None and not torch.isfinite(gbs[l]).all():
                    return f"non-finite gradient for {layer.bias}"
                flat, ix = ws[l].reshape(-1), index[l]
                for role, positions in (("parent", ix.par_flat), ("child", ix.kap_flat)):
                    zero = (flat[positions] == 0).nonzero()
                    if len(zero):
                        o, i, t = _unravel(int(positions[int(zero[0])]), ws[l].shape)
                        return (f"zero designated ({role}) weight {layer.weight}[{o}, {i}"
                                f"{f', tap {t}' if ws[l].shape[-1] > 1 else ''}]: it kills the "
                                "designated routes through it (re-initialise it, e.g. with "
                                "gsgd.skeleton_init)")
        for p in self._plain:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"non-finite gradient for {self._names.get(id(p), '?')}"
        return "non-finite value (overflow in the sums of w * grad)"

    def _scratch_for(self, like: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
        """A reusable work tensor per (rows, cols) shape: kept across steps, never saved."""
        pool = self.__dict__.setdefault("_scratch", {})

        def get(rows: int, cols: int) -> torch.Tensor:
            key = (rows, cols, like.dtype, like.device)
            if key not in pool:
                pool[key] = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
            return pool[key]
        return get

    def _buffer(self, p: nn.Parameter) -> torch.Tensor:
        """The G-space momentum buffer of p (zeros when new)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state["momentum_buffer"]


def _unravel(flat: int, shape: torch.Size) -> tuple[int, int, int]:
    """(out, in, tap) of a flat position in an ``(out, in, taps)`` tensor."""
    _, h_in, taps = shape
    return flat // (h_in * taps), (flat // taps) % h_in, flat % taps
