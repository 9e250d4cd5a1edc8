"""GSGD: SGD in the positively scale-invariant space of a ReLU network, as a torch optimizer.

A thin shell: gather (parameters, gradients, buffers, hyper-parameters) -> :func:`gsgd.fast.
fast_step` -> record (clip counts, skipped steps). The step's formulas are in
:func:`gsgd.reference.reference_step`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn

from gsgd.basis import route_products
from gsgd.fast import (
    BlockStep,
    CompileFailed,
    PlainStep,
    PreparedStep,
    StepOutcome,
    fast_step,
    prepare_fused,
    run_prepared,
    step_numbers,
)
from gsgd.optim.common import (
    BoundBlock,
    GBlockOptimizer,
    InitScaleWarning,
    NonFiniteError,
    layer_problem,
)
from gsgd.reference import BlockTensors, StepHyper
from gsgd.structure import Structure


class Lane(NamedTuple):
    """The steady state of a compiled step, prepared once (:func:`gsgd.fast.prepare_fused`):
    the same whole blocks every step, each with a carried bound, no plain parameter with a
    gradient, every group raising on refused steps. ``settings``: per block, what of its
    group must not change (:func:`_settings`); ``carriers``: how many carrier ratios the
    blocks have (for the clipping warning)."""

    prepared: PreparedStep
    keys: tuple[tuple[int, int, int], ...]
    parts: tuple[BoundBlock, ...]
    settings: tuple[tuple, ...]
    carriers: int


def _settings(group: dict) -> tuple:
    """What of a param group a prepared step depends on besides its numbers."""
    return (bool(group["momentum"]), bool(group["nesterov"]), bool(group["weight_decay"]),
            tuple(bool(x) for x in group.get("bp_norm", (0.0, 0.0))), bool(group["maximize"]),
            group["compile"] is True, group["on_nonfinite"])


def _carriers(steps: list[BlockStep]) -> int:
    """How many carrier ratios the blocks of a step have."""
    return sum(r.num_carriers for s in steps for r in s.tensors.routes)


def _hyper(group: dict) -> StepHyper:
    return StepHyper(group["lr"], group["momentum"], group["dampening"], group["weight_decay"],
                     group["nesterov"], group["max_ratio"], group["maximize"],
                     tuple(group.get("bp_norm", (0.0, 0.0))))


class GSGD(GBlockOptimizer):
    r"""G-SGD (Meng et al., ICLR 2019): SGD on the basis-path values of every G-block.

    For each G-block (a positively scalable chain found by :func:`gsgd.discover`), the step
    :func:`gsgd.reference.reference_step` (docs/math.md sections 4-7):

    .. code-block:: text

        x_e = w_e * g_e                                 (g = dL/dw from ordinary backprop)
        d_e = dL/dv_e  by the inverse chain rule        (reference.g_space_gradient)
        d_e += weight_decay * v_e                       (L2 on basis-path values)
        buf = momentum * buf + (1 - dampening) * d      (heavy ball, in G-space)
        s   = d + momentum * buf if nesterov else buf
        v'  = v - lr * s   -> new weights by weight allocation, frozen edges unchanged

    What runs is :func:`gsgd.fast.fast_step`, tested step by step against the reference:
    eagerly an in-place pass per layer (``on_nonfinite="raise"``) or a pass gated on the device
    (``"skip"``: weight-sized temporaries, slower), or torch.compile graphs (``compile=True``).
    Every step is invariant under the rescaling group G. Parameters outside every G-block get
    torch SGD with the same hyper-parameters (see :attr:`plain_parameters`).

    Args:
        params: an ``nn.Module`` (the common case: its structure is discovered), or parameters /
            param groups together with ``model=`` (or ``structure=``).
        lr: learning rate (in G-space).
        momentum, dampening, nesterov: as in ``torch.optim.SGD``, applied to dL/dv.
        weight_decay: L2 penalty on basis-path values (lambda/2 * v^2).
        bp_norm: ``(lam_pos, lam_neg)`` of the basis-path regulariser
            lam_pos/2 * sum_{P+} v^2 + lam_neg/2 * sum_{carriers} log(|v|)^2 (OUR DESIGN, docs/
            math.md section 11: the BP-norm paper's own formula is unconfirmed), added to the
            G-space gradient of the G-blocks; not applied to plain parameters.
        max_ratio: bound B of the carrier-ratio guard: |R| = |v'/v| is kept in [1/B, B], its
            sign kept (a negative R is an ordinary step); every changed entry is counted
            (:meth:`clip_counts`). Within the bounds the step is exactly the paper's.
        on_nonfinite: a step is taken whole or not at all. A non-finite gradient or weight, or
            a zero designated weight, in a group with ``"raise"`` (default) raises
            :class:`NonFiniteError` naming the parameter, before anything is written (one host
            sync per step). If the problems lie only in groups with ``"skip"``, the step is not
            taken and every group counts it in :meth:`skipped_steps` (also
            ``param_groups[i]["skipped_steps"]``, brought up to date by ``skipped_steps()``,
            ``clip_counts()`` and ``state_dict()``). When every group skips, a step makes no
            host sync (writes are gated on the device), except a first momentum step with
            dampening > 0 (checked on the host, so that a refused one leaves no buffers) and a
            tensor ``lr`` (read each step).
        compile: build the step with ``torch.compile`` (lazily, on the first step: seconds to
            tens of seconds once per process and shape); the fast path. If compiling fails (no
            C++ compiler, say) it warns and takes the eager step. See benchmarks/README.md.
        maximize: step up the objective (torch.optim.SGD's ``maximize``): the G-SGD step of
            the negated loss.
        init: ``"skeleton"`` sets every designated weight to 1 now (the paper's init,
            :func:`gsgd.skeleton_init`; it changes the function); None (default) leaves the
            weights alone. Where the optimizer is built again after weights are loaded
            (Lightning's ``configure_optimizers`` on resume, a Trainer resuming), call
            ``skeleton_init`` where the model is built instead.
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
        maximize: bool = False,
        *,
        bp_norm: tuple[float, float] = (0.0, 0.0),
        model: nn.Module | None = None,
        structure: Structure | None = None,
        batchnorm: str | None = None,
        init: str | None = None,
    ) -> None:
        if init not in (None, "skeleton"):
            raise ValueError(f"GSGD: invalid init={init!r}: supported values are None (keep the "
                             "model's weights) and 'skeleton' (the paper's init)")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, max_ratio=max_ratio,
                        on_nonfinite=on_nonfinite, compile=compile, maximize=maximize,
                        bp_norm=tuple(bp_norm), skipped_steps=0)
        self._setup("GSGD", params, defaults, model, structure, batchnorm)
        if init == "skeleton":
            from gsgd.discovery import unwrap
            from gsgd.group import skeleton_init

            skeleton_init(unwrap(params if isinstance(params, nn.Module) else model),
                          self.structure)
        self._warn_if_badly_scaled()

    #: a block whose weight-space step lr * g / c^2 is amplified more than this (geometric
    #: mean of 1/c^2 over a layer's edges) gets an InitScaleWarning at construction
    AMPLIFICATION_WARN = 100.0
    #: a step whose ratio guard changes at least this share of the carrier ratios warns
    CLIP_SHARE_WARN = 0.5

    def step_amplification(self) -> list[tuple[float, str]]:
        """Per G-block: the largest, over its layers, geometric mean of 1/c_e^2 over the
        layer's edges (how much the weight-space step lr * g / c^2 is amplified against the
        skeleton init, where c = 1), and that layer's weight."""
        found = []
        for bp in self._blocks:
            ws = [w.detach().reshape(shape) for w, shape in zip(bp.weights, bp.shapes,
                                                                 strict=True)]
            alphas, betas = route_products(ws, bp.routes)
            with torch.no_grad():
                logs = [float(betas[l + 1].abs().log().mean() + alphas[l].abs().log().mean())
                        for l in range(len(ws))]
            worst = min(range(len(logs)), key=logs.__getitem__)
            found.append((float(torch.tensor(-2 * logs[worst], dtype=torch.float64).exp()),
                          bp.block.layers[worst].weight))
        return found

    def _warn_if_badly_scaled(self) -> None:
        bad = [(i, a, name) for i, (a, name) in enumerate(self.step_amplification())
               if not a <= self.AMPLIFICATION_WARN]
        if not bad:
            return
        i, amplification, name = max(bad, key=lambda t: t[1])
        lr = self.param_groups[self._blocks[i].group]["lr"]
        warnings.warn(
            f"GSGD: the designated route products of {len(bad)} of {len(self._blocks)} "
            f"G-block(s) are small (worst: {name}, where the G-space step lr * g / c^2 is "
            f"amplified {amplification:.3g}x in weight space): with lr={lr} this init will "
            "likely ruin the model within a few steps. Use the paper's init, GSGD(model, ..., "
            "init='skeleton') or gsgd.skeleton_init(model, gsgd.discover(model)) (it changes "
            f"the function), or an lr around {lr / amplification:.2g}", InitScaleWarning,
            stacklevel=3)

    _frozen_ok = True  # frozen layers cut blocks (see _gather_blocks)
    _any_layout = True  # channels_last weights step on a contiguous copy (see _block_step)

    def _bound(self, bound: list) -> None:
        self.__dict__.pop("_carried", None)
        self.__dict__.pop("_lane", None)
        if "_blocks" in self.__dict__:
            self._flush()  # the pending counters are per block of the old binding
        self._blocks = self._bound_blocks(bound)
        self._reset_pending()

    # ------------------------------------------------------------------ counters
    def _reset_pending(self) -> None:
        """Counts of gated steps, kept on the device until read (reading is a host sync)."""
        self._pending_clips: list[torch.Tensor | None] = [None] * len(self._blocks)
        self._pending_skips: torch.Tensor | None = None
        self._steps_since_flush = 0

    def _flush(self) -> None:
        """Fold the device counters into ``state`` / ``param_groups`` (Python ints)."""
        for bp, pending in zip(self._blocks, self._pending_clips, strict=True):
            if pending is not None:
                state = self.state[bp.weights[0]]
                # a Python int: load_state_dict would cast a tensor to the parameter's dtype
                state["clipped"] = state.get("clipped", 0) + int(pending)
        if self._pending_skips is not None:
            skipped = int(self._pending_skips)
            for group in self.param_groups:
                group["skipped_steps"] += skipped
            steps = self._steps_since_flush
            if skipped >= max(2, 0.1 * steps):
                warnings.warn(f"GSGD: {skipped} of the last {steps} steps were skipped "
                              "(non-finite values): the lr is probably too large for this init "
                              "(see step_amplification() and init='skeleton')",
                              InitScaleWarning, stacklevel=3)
        self._reset_pending()

    def clip_counts(self) -> list[int]:
        """Per G-block: how many carrier ratios the guard has changed so far."""
        self._flush()
        return [int(self.state[b.weights[0]].get("clipped", 0)) for b in self._blocks]

    def skipped_steps(self) -> list[int]:
        """Per param group: how many steps were not taken (``on_nonfinite="skip"``)."""
        self._flush()
        return [int(group["skipped_steps"]) for group in self.param_groups]

    def state_dict(self) -> dict:
        self._flush()
        return super().state_dict()

    def __getstate__(self) -> dict:
        self._flush()
        return super().__getstate__()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._reset_pending()
        self.__dict__.pop("_carried", None)
        self.__dict__.pop("_lane", None)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """One G-SGD step of every G-block (:func:`gsgd.reference.reference_step`, run by
        :func:`gsgd.fast.fast_step`) and a torch SGD step of the other parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._lane_step():
            return loss
        owners, steps, fresh, copies, parts = self._gather_blocks()
        gated = self._gated(steps)
        plain_params, plain = self._gather_plain(fresh, gated)
        if not steps and not plain:
            return loss
        work = self._work
        try:
            outcome = fast_step(steps, plain, gated=gated, work=work)
        except CompileFailed as exc:
            self._compile_failed(str(exc))
            steps = [s._replace(compile=False) for s in steps]
            outcome = fast_step(steps, plain, gated=gated, work=work)
        for p, copy in copies:  # channels_last weights: the step wrote a contiguous copy
            p.detach().copy_(copy)
        self._keep_carried(parts, steps, outcome.carried)
        if outcome.compile_error is not None:
            self._compile_failed(outcome.compile_error)
        self._record(outcome, gated, owners, fresh)
        self._steps_since_flush += 1
        if outcome.clipped_total:
            self._warn_if_clipping(outcome.clipped_total, _carriers(steps))
        for params, p in zip(plain_params, plain, strict=True):  # buffers torch SGD created
            for q, buf in zip(params, p.buffers or [None] * len(params), strict=True):
                if buf is not None:
                    self.state[q]["momentum_buffer"] = buf
        self._lane = None
        if outcome.taken is True and not (gated or plain or copies or fresh):
            self._lane = self._make_lane(parts, steps)
        return loss

    # ------------------------------------------------------------------ the prepared step
    #: take repeated compiled steps by their prepared call (:class:`Lane`); False: always the
    #: whole path (the tests compare the two)
    LANE = True

    def _make_lane(self, parts: list[tuple[tuple[int, int, int], BoundBlock]],
                   steps: list[BlockStep]) -> Lane | None:
        """The lane of a step just taken by one graph, if it covers every block whole."""
        whole = len(parts) == len(self._blocks) and all(
            key == (k, 0, len(bp.weights)) for k, ((key, _), bp)
            in enumerate(zip(parts, self._blocks, strict=True)))
        if not (self.LANE and whole) or any(bp.approx_bn for bp in self._blocks) \
                or any(s.first or s.hyper.maximize for s in steps):  # maximize: negated grads
            return None
        prepared = prepare_fused(steps)
        if prepared is None:
            return None
        return Lane(prepared, tuple(k for k, _ in parts), tuple(p for _, p in parts),
                    tuple(_settings(self.param_groups[p.group]) for _, p in parts),
                    _carriers(steps))

    def _lane_step(self) -> bool:
        """Take the step by the prepared call if nothing it depends on has changed since it
        was made (the stamps of every tensor, the groups' settings, which parameters have
        gradients); False (nothing done) otherwise, or where its graph wrote nothing."""
        lane: Lane | None = self.__dict__.get("_lane")
        if lane is None:
            return False
        kept = self.__dict__.get("_carried", {})
        grads, hypers, carried, ages = [], [], [], []
        for key, part, settings in zip(lane.keys, lane.parts, lane.settings, strict=True):
            entry = kept.get(key)
            group = self.param_groups[part.group]
            if entry is None or entry[2] >= self.CARRY_STEPS or _settings(group) != settings:
                return False
            stamp = self._stamps(part)
            if stamp != entry[0]:
                return False
            gs = []
            for w, shape in zip(part.weights, part.shapes, strict=True):
                g = w.grad
                if g is None or g.is_sparse or not g.is_contiguous() or g.dtype != w.dtype:
                    return False
                gs.append(g.view(shape))
            gbs = []
            for b in part.biases:
                gb = None if b is None else b.grad
                if b is not None and (gb is None or gb.is_sparse or gb.dtype != b.dtype):
                    return False
                gbs.append(gb)
            grads.append((gs, gbs))
            hypers.append(step_numbers(_hyper(group), False, part.weights[0])[0])
            carried.append(entry[1])
            ages.append(entry[2])
        if any(p.grad is not None for p in self._plain):
            return False
        outcome = run_prepared(lane.prepared, grads, hypers, carried)
        if outcome is None:
            return False
        for key, part, carry, age in zip(lane.keys, lane.parts, outcome.carried, ages,
                                         strict=True):
            kept[key] = (self._stamps(part), carry, age + 1)
        self._record(outcome, False, [k for k, _, _ in lane.keys], [])
        self._steps_since_flush += 1
        if outcome.clipped_total:
            self._warn_if_clipping(outcome.clipped_total, lane.carriers, depth=1)
        return True

    def _gated(self, steps: list[BlockStep]) -> bool:
        """Take the step without a host sync? Only if every group skips refused steps, and no
        first momentum step is damped: a refused one would leave zero buffers behind, which
        the next step would damp as if started (such a step is checked on the host)."""
        if not all(self.param_groups[g]["on_nonfinite"] == "skip" for g in self._groups_used()):
            return False
        if any(s.first and s.hyper.dampening for s in steps):
            return False
        return not any(p.grad is not None and "momentum_buffer" not in self.state[p]
                       and self.param_groups[self._plain_group[id(p)]]["momentum"]
                       and self.param_groups[self._plain_group[id(p)]]["dampening"]
                       for p in self._plain)

    def _groups_used(self) -> set[int]:
        return {bp.group for bp in self._blocks} | set(self._plain_group.values())

    def _record(self, outcome: StepOutcome, gated: bool, owners: list[int],
                fresh: list[nn.Parameter]) -> None:
        """Count clips (on the device), a skipped step, or raise for a refused one."""
        if gated:
            refused = (~outcome.taken).long()
            self._pending_skips = refused if self._pending_skips is None \
                else self._pending_skips + refused
        elif not outcome.taken:
            for p in fresh:  # buffers made for a step that was not taken are not state
                self.state[p].pop("momentum_buffer", None)
            self._refuse(outcome.overflow)
            return
        for k, count in zip(owners, outcome.clipped, strict=True):
            pending = self._pending_clips[k]
            self._pending_clips[k] = count if pending is None else pending + count

    def _warn_if_clipping(self, clipped: int, carriers: int, depth: int = 0) -> None:
        """Warn if the guard changed many ratios; ``depth``: frames between this and step()."""
        if carriers and clipped >= self.CLIP_SHARE_WARN * carriers:
            warnings.warn(
                f"GSGD: the carrier-ratio guard changed {clipped} of {carriers} carrier ratios "
                "in one step: the lr is too large for this init (the step leaves the paper's "
                "trajectory; see step_amplification() and init='skeleton')", InitScaleWarning,
                stacklevel=5 + depth)  # past step() and torch's two wrappers of it

    def _compile_failed(self, message: str) -> None:
        warnings.warn(f"GSGD(compile=True): torch.compile failed ({message}); falling back to "
                      "the eager step (compile=False)", RuntimeWarning, stacklevel=3)
        for group in self.param_groups:
            group["compile"] = False

    # ------------------------------------------------------------------ gather
    def _gather_blocks(self) -> tuple[list[int], list[BlockStep], list[nn.Parameter],
                                      list[tuple[nn.Parameter, torch.Tensor]],
                                      list[tuple[tuple[int, int, int], BoundBlock]]]:
        """Each block's step (its index, views of its tensors and its group's
        hyper-parameters), the parameters whose momentum buffers are new, the channels_last
        copies to write back and (key, block or part) of each step. A layer takes part
        only if the optimizer holds all its parameters and each has a gradient: a frozen layer
        (``requires_grad=False``, or ``grad`` None) is never modified and cuts its block into
        runs of trainable layers, each a G-block of its own (its end units are block
        boundaries). Nothing is cached across steps (no freed gradient is kept alive)."""
        owners: list[int] = []
        steps: list[BlockStep] = []
        fresh: list[nn.Parameter] = []
        copies: list[tuple[nn.Parameter, torch.Tensor]] = []
        parts = self._active_parts()
        for key, part in parts:
            owners.append(key[0])
            carried = self._carried_for(key, part)
            steps.append(self._block_step(part, fresh, copies)._replace(carried=carried))
        return owners, steps, fresh, copies, parts

    #: a carried write bound is measured afresh after this many steps
    CARRY_STEPS = 64

    def _stamps(self, bp: BoundBlock) -> tuple:
        """(version, address) of every tensor of a block's step: equal stamps mean nothing has
        written them through autograd-visible in-place ops, ``copy_``, ``load_state_dict`` or
        ``.to()`` since (``.data`` writes are not seen; hence :data:`CARRY_STEPS`)."""
        ts = [p for p in (*bp.weights, *bp.biases) if p is not None]
        ts += [self.state[p]["momentum_buffer"] for p in list(ts)
               if "momentum_buffer" in self.state[p]]
        return tuple((t._version, t.data_ptr()) for t in ts)

    def _carried_for(self, key: tuple, bp: BoundBlock) -> torch.Tensor | None:
        """The write bound the last step left for this block, if its tensors are unchanged."""
        entry = self.__dict__.get("_carried", {}).get(key)
        if entry is None or entry[2] >= self.CARRY_STEPS or entry[0] != self._stamps(bp):
            return None
        return entry[1]

    def _keep_carried(self, parts: list[tuple[tuple, BoundBlock]], steps: list[BlockStep],
                      carried: list[torch.Tensor | None] | None) -> None:
        """Remember what each block's step left for the next one (with the stamps after it);
        ``parts``: (key, block or part) of each step, as :meth:`_gather_blocks` made them."""
        if carried is None:  # nothing written: what was kept is still valid
            return
        kept = self.__dict__.setdefault("_carried", {})
        for (key, part), step, carry in zip(parts, steps, carried, strict=True):
            if carry is None:
                kept.pop(key, None)
                continue
            age = 0 if step.carried is None else kept[key][2] + 1
            kept[key] = (self._stamps(part), carry, age)

    def _block_step(self, bp: BoundBlock, fresh: list[nn.Parameter],
                    copies: list[tuple[nn.Parameter, torch.Tensor]]) -> BlockStep:
        """The views, gradients, buffers and hyper-parameters of one (part of a) block. A
        weight in another memory layout (channels_last) is stepped as a contiguous copy, which
        ``copies`` lists for writing back."""
        group = self.param_groups[bp.group]
        layers = bp.block.layers
        ws = []
        for w, shape in zip(bp.weights, bp.shapes, strict=True):
            if not w.is_contiguous():
                copy = w.detach().contiguous()
                copies.append((w, copy))
                w = copy
            ws.append(w.detach().view(shape))
        gs = [self._grad_view(w.grad, v, layer) for w, v, layer in zip(bp.weights, ws, layers,
                                                                      strict=True)]
        gbs = [None if b is None else self._checked(b.grad, layer.bias)
               for b, layer in zip(bp.biases, layers, strict=True)]
        if group["maximize"]:  # the step of -L (torch.optim.SGD negates the same way)
            gs = [-g for g in gs]
            gbs = [None if g is None else -g for g in gbs]
        bufs = bias_bufs = None
        first = False
        if group["momentum"]:
            params = [p for p in (*bp.weights, *bp.biases) if p is not None]
            first = all("momentum_buffer" not in self.state[p] for p in params)
            fresh += [p for p in params if "momentum_buffer" not in self.state[p]]
            bufs = [self._buffer(w).view(v.shape) for w, v in zip(bp.weights, ws, strict=True)]
            bias_bufs = [None if b is None else self._buffer(b) for b in bp.biases]
        row_scales = None
        if bp.approx_bn:  # the paper's heuristic (NOT invariant): per-filter weight norms
            row_scales = [w.reshape(w.shape[0], -1).norm(dim=1) if layer.approx_bn else None
                          for layer, w in zip(layers, ws, strict=True)]
        tensors = BlockTensors(bp.routes, ws, gs, [None if b is None else b.detach()
                                                   for b in bp.biases],
                               gbs, bufs, bias_bufs, row_scales)
        return BlockStep(tensors, _hyper(group), first, bool(group["compile"]))

    def _gather_plain(self, fresh: list[nn.Parameter], gated: bool
                      ) -> tuple[list[list[nn.Parameter]], list[PlainStep]]:
        """The parameters outside every G-block that have a gradient, per param group. A gated
        step gets zero buffers for new ones (torch SGD would make them only when it runs)."""
        by_group: dict[int, list[nn.Parameter]] = {}
        for p in self._plain:
            if p.grad is not None:
                by_group.setdefault(self._plain_group[id(p)], []).append(p)
        plain: list[PlainStep] = []
        for gi, params in by_group.items():
            group = self.param_groups[gi]
            grads = [self._checked(p.grad, self._names.get(id(p), "?")) for p in params]
            bufs = None
            if group["momentum"]:
                bufs = [None if "momentum_buffer" not in self.state[p] else self._buffer(p)
                        for p in params]
                if gated:
                    for p, b in zip(params, bufs, strict=True):
                        if b is None:
                            fresh.append(p)
                    bufs = [self._buffer(p) for p in params]
            plain.append(PlainStep(list(params), grads, bufs, _hyper(group)))
        return list(by_group.values()), plain

    @staticmethod
    def _checked(g: torch.Tensor, name: str) -> torch.Tensor:
        if g.is_sparse:
            raise ValueError(f"GSGD: sparse gradient for {name}")
        return g

    def _grad_view(self, g: torch.Tensor, w: torch.Tensor, layer) -> torch.Tensor:
        if g.is_sparse:
            raise ValueError(f"GSGD: sparse gradient for {layer.weight}")
        return g.view(w.shape) if g.is_contiguous() else g.reshape(w.shape)

    def _buffer(self, p: nn.Parameter) -> torch.Tensor:
        """The G-space momentum buffer of p (zeros when new), in p's dtype and on p's device
        (a model moved with ``.to()`` after some steps takes its buffers along)."""
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(
                p, memory_format=torch.contiguous_format)
        elif buf.dtype != p.dtype or buf.device != p.device or not buf.is_contiguous():
            buf = state["momentum_buffer"] = buf.to(device=p.device, dtype=p.dtype,
                                                    memory_format=torch.contiguous_format)
        return buf

    # ------------------------------------------------------------------ refusal
    def _refuse(self, overflow: bool = False) -> None:
        """The step was refused and nothing written: raise naming the first problem in a group
        with ``on_nonfinite="raise"``, or count a skipped step. ``overflow``: the inputs were
        finite, the values the step would write were not."""
        if overflow:
            if any(self.param_groups[g]["on_nonfinite"] == "raise" for g in self._groups_used()):
                raise NonFiniteError(
                    "GSGD: the step would write non-finite values (finite weights and "
                    "gradients, but w - lr * s / c overflows); the step was not taken. Likely "
                    "cause: an lr far too large for this init (the weight-space step is "
                    "lr * g / c^2: see step_amplification() and init='skeleton'); "
                    "on_nonfinite='skip' skips such steps")
            for group in self.param_groups:
                group["skipped_steps"] += 1
            return
        problems = self._find_problems()
        for gi, problem in problems:
            if self.param_groups[gi]["on_nonfinite"] == "raise":
                raise NonFiniteError(
                    f"GSGD: {problem}; the step was not taken. Likely cause: an lr too large "
                    "for this init (the weight-space step is lr * g / c^2: see "
                    "step_amplification(), clip_counts() and init='skeleton'); "
                    "on_nonfinite='skip' skips such steps")
        if not problems and any(self.param_groups[g]["on_nonfinite"] == "raise"
                                for g in self._groups_used()):
            raise NonFiniteError("GSGD: non-finite value (overflow in the sums of w * grad); "
                                 "the step was not taken")
        for group in self.param_groups:
            group["skipped_steps"] += 1

    def _find_problems(self) -> list[tuple[int, str]]:
        """(group, description) of every parameter with a non-finite value or a zero designated
        weight (at most one per layer)."""
        found: list[tuple[int, str]] = []
        for bp in self._blocks:
            for layer, w, b, r in zip(bp.block.layers, bp.weights, bp.biases, bp.routes,
                                      strict=True):
                problem = layer_problem(layer, w, b, r)
                if problem:
                    found.append((bp.group, problem))
        for p in self._plain:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                found.append((self._plain_group[id(p)],
                              f"non-finite gradient for {self._names.get(id(p), '?')}"))
        return found
