r"""GAdam / GAdamW: Adam in the positively scale-invariant space of a ReLU network.

The step of a G-block is :func:`gsgd.reference.reference_adam_step` (docs/math.md section 11):
Adam's moments of dL/dv per basis path, torch.optim.Adam's bias correction and eps, new
basis-path values v' = v - lr * s', and G-SGD's weight allocation with its carrier-ratio guard.
This optimizer runs that reference step eagerly, out of place, checks every new value and only
then writes (correctness first; a fast in-place or compiled path is future work).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn
from torch.optim.adam import adam as torch_adam

from gsgd.optim.common import BoundBlock, GBlockOptimizer, NonFiniteError, layer_problem
from gsgd.reference import (
    AdamHyper,
    AdamMoments,
    AdamState,
    AdamUpdate,
    BlockTensors,
    reference_adam_step,
)
from gsgd.structure import Structure

__all__ = ["GAdam", "GAdamW"]


class _PlainUpdate(NamedTuple):
    """torch Adam's step of one group's plain parameters, computed on copies (not yet
    written): new values, moments and step counts, in the order of ``params``."""

    params: list[nn.Parameter]
    values: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    max_exp_avg_sqs: list[torch.Tensor]
    steps: list[torch.Tensor]


def _scalar_dtype() -> torch.dtype:
    """The dtype of torch Adam's ``step`` tensors (float64 under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _hyper(group: dict) -> AdamHyper:
    beta1, beta2 = group["betas"]
    return AdamHyper(float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"],
                     group["decoupled_weight_decay"], group["decay_carriers"], group["amsgrad"],
                     group["max_ratio"], group["maximize"], tuple(group["bp_norm"]))


class GAdam(GBlockOptimizer):
    r"""Adam in G-space: Adam's rule on the basis-path values of every G-block.

    For each G-block (a positively scalable chain found by :func:`gsgd.discover`), the step
    :func:`gsgd.reference.reference_adam_step` (docs/math.md section 11):

    .. code-block:: text

        d  = dL/dv by the inverse chain rule  (+ weight_decay * v~ unless decoupled)
                                               (+ dR/dv of the basis-path regulariser bp_norm)
        m  = b1 m + (1 - b1) d,   s = b2 s + (1 - b2) d^2,   t += 1        (per basis path)
        u  = (m / (1 - b1^t)) / (sqrt(s / (1 - b2^t)) + eps)    (AMSGrad: the max of s)
        s' = u + weight_decay * v~ if decoupled_weight_decay else u
        v' = v - lr * s'  -> weights by G-SGD's allocation: carrier ratios R = v'/v with |R|
             bounded to [1/max_ratio, max_ratio], sign kept, counted (clip_counts()); frozen
             edges unchanged

    v~ = v on the positive basis paths (non-carrier edges and biases), and on the carriers too
    with ``decay_carriers=True``. Every step is invariant under the rescaling group G (the
    moments are fed invariant numbers only). Parameters outside every G-block get torch's own
    Adam/AdamW step (``torch.optim.adam.adam``) with the same group hyper-parameters
    (:attr:`plain_parameters`; not invariant, and ``bp_norm`` does not apply to them).

    This is an eager implementation that calls the reference step: the whole step is computed
    out of place, checked, then written (a fast path is future work; the step costs a few
    weight-sized temporaries and one host sync per tensor for the checks).

    Where the authors' G-Adam (github MSRA-COLT/gsgd, ``gsgd_cnn/opt/gopt_Adam*.py``, dead code
    in their release) differs, and why this one does not follow it:

    * their dL/dv assumes every frozen designated weight is 1 (they skeleton-initialise at
      construction): exact only in that gauge, not invariant elsewhere. Here the inverse chain
      rule is exact in any gauge, and nothing is re-initialised;
    * their carrier ratio R is unbounded (R near 0 divides downstream weights by almost
      nothing); here G-SGD's sign-keeping guard, counted;
    * their eps sits outside the root before bias correction (eps / sqrt(1 - b2^t)) and their
      beta2 default is 0.99; here torch.optim.Adam's conventions and defaults;
    * they accept ``weight_decay`` and never use it; here coupled (Adam) or decoupled (AdamW)
      decay on basis-path values;
    * their carrier indexing is right for unimodal width profiles only; here any profile.

    Args:
        params: an ``nn.Module`` (its G-blocks are discovered), or parameters / param groups
            together with ``model=`` (or ``structure=``).
        lr, betas, eps, amsgrad, maximize: as in ``torch.optim.Adam``, in G-space.
        weight_decay: L2 on basis-path values: added to dL/dv (Adam's coupled form) or, with
            ``decoupled_weight_decay=True`` (:class:`GAdamW`), to the step direction:
            v' = v (1 - lr * weight_decay) - lr * u.
        decay_carriers: also decay the carriers' basis paths (default False). The default
            decays the positive basis paths only: for a non-carrier edge the decay is then
            ordinary weight decay of that weight (lam v_e / c_e = lam w_e) in any gauge, and
            the carriers, which divide every non-basis path value, are not pulled to 0 (pulling
            them would inflate those paths). True is GSGD's ``weight_decay`` convention.
        bp_norm: (lam_pos, lam_neg) of the basis-path regulariser
            :func:`gsgd.reference.basis_path_norm` (OUR DESIGN, not the BP-norm paper's
            confirmed formula): lam_pos / 2 * sum_{P+} v^2 + lam_neg / 2 * sum_c log(|v_c|)^2,
            its gradient added to d before the moments. Default (0, 0): off.
        max_ratio: bound B of the carrier-ratio guard (as GSGD).
        on_nonfinite: ``"raise"`` (default): a non-finite gradient or weight, a zero
            designated weight, or a step whose new values would not be finite raises
            :class:`NonFiniteError` naming the parameter, before anything is written;
            ``"skip"``: the step is not taken and every group counts it
            (:meth:`skipped_steps`). As GSGD, a step is taken whole or not at all.
        model, structure, batchnorm: as GSGD (``batchnorm="approximate"`` multiplies d by the
            per-filter weight norms before the moments: the paper's heuristic, NOT invariant).
    """

    _owner_name = "GAdam"
    _plain_optimizer = "Adam"
    _frozen_ok = True  # frozen layers cut blocks (as GSGD)
    _any_layout = True  # weights are read with reshape and written with copy_

    def __init__(
        self,
        params: nn.Module | Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        decay_carriers: bool = False,
        bp_norm: tuple[float, float] = (0.0, 0.0),
        max_ratio: float = 100.0,
        on_nonfinite: str = "raise",
        model: nn.Module | None = None,
        structure: Structure | None = None,
        batchnorm: str | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay,
                        decay_carriers=decay_carriers, bp_norm=tuple(bp_norm),
                        max_ratio=max_ratio, on_nonfinite=on_nonfinite, skipped_steps=0)
        self._setup(self._owner_name, params, defaults, model, structure, batchnorm)

    def _bound(self, bound: list) -> None:
        self._blocks = self._bound_blocks(bound)

    def summary(self) -> str:
        """The G-structure this optimizer works on, and the parameters left to torch Adam."""
        return self.structure.summary().replace("plain SGD:", f"plain {self._plain_optimizer}:")

    def clip_counts(self) -> list[int]:
        """Per G-block: how many carrier ratios the guard has changed so far."""
        return [int(self.state.get(b.weights[0], {}).get("clipped", 0)) for b in self._blocks]

    def skipped_steps(self) -> list[int]:
        """Per param group: how many steps were not taken (``on_nonfinite="skip"``)."""
        return [int(group["skipped_steps"]) for group in self.param_groups]

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """One G-Adam step of every G-block (:func:`gsgd.reference.reference_adam_step`) and a
        torch Adam step of the other parameters; computed whole, checked, then written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        parts = self._gather_blocks()
        plain = self._gather_plain()
        if not parts and not plain:
            return loss
        problems = self._find_problems(parts, plain)
        if problems:
            self._refuse(problems)
            return loss
        updates = [reference_adam_step(self._tensors(part), self._adam_state(part),
                                       _hyper(self.param_groups[part.group]))
                   for _, part in parts]
        plain_updates = [self._plain_update(gi, params) for gi, params in plain.items()]
        problems = self._find_overflow(parts, updates, plain, plain_updates)
        if problems:
            self._refuse(problems)
            return loss
        for (k, part), update in zip(parts, updates, strict=True):
            self._write_block(k, part, update)
        for update in plain_updates:
            self._write_plain(update)
        return loss

    # ------------------------------------------------------------------ gather
    def _gather_blocks(self) -> list[tuple[int, BoundBlock]]:
        """(block index, part) of every run of layers that takes part in this step: a layer
        does only if the optimizer holds all its parameters and each has a gradient (a frozen
        layer, or one whose ``grad`` is None, is never modified and cuts its block, as GSGD)."""
        parts = [(key[0], part) for key, part in self._active_parts()]
        for _, part in parts:
            for p in (*part.weights, *part.biases):
                if p is not None:
                    self._refuse_sparse(p)
        return parts

    def _gather_plain(self) -> dict[int, list[nn.Parameter]]:
        """The parameters outside every G-block that have a gradient, per param group."""
        by_group: dict[int, list[nn.Parameter]] = {}
        for p in self._plain:
            if p.grad is not None:
                self._refuse_sparse(p)
                by_group.setdefault(self._plain_group[id(p)], []).append(p)
        return by_group

    def _refuse_sparse(self, p: nn.Parameter) -> None:
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError(f"{self._owner}: sparse gradient for {self._names.get(id(p), '?')}")

    def _tensors(self, part: BoundBlock) -> BlockTensors:
        """The ``(out, in, taps)`` views of a part's weights and gradients, and its biases."""
        ws = [w.detach().reshape(shape) for w, shape in zip(part.weights, part.shapes,
                                                             strict=True)]
        gs = [w.grad.reshape(shape) for w, shape in zip(part.weights, part.shapes, strict=True)]
        row_scales = None
        if part.approx_bn:  # the paper's heuristic (NOT invariant): per-filter weight norms
            row_scales = [w.reshape(w.shape[0], -1).norm(dim=1) if layer.approx_bn else None
                          for layer, w in zip(part.block.layers, ws, strict=True)]
        return BlockTensors(part.routes, ws, gs,
                            [None if b is None else b.detach() for b in part.biases],
                            [None if b is None else b.grad for b in part.biases],
                            row_scales=row_scales)

    def _moments(self, p: nn.Parameter, shape: tuple[int, ...]) -> AdamMoments | None:
        """The Adam state of p as an :class:`AdamMoments` (None before its first step)."""
        st = self.state.get(p, {})
        if "exp_avg" not in st:
            return None

        def get(key: str) -> torch.Tensor | None:
            t = st.get(key)
            return None if t is None else t.to(device=p.device, dtype=p.dtype).reshape(shape)

        return AdamMoments(float(st["step"]), get("exp_avg"), get("exp_avg_sq"),
                           get("max_exp_avg_sq"))

    def _adam_state(self, part: BoundBlock) -> AdamState:
        return AdamState([self._moments(w, s) for w, s in zip(part.weights, part.shapes,
                                                               strict=True)],
                         [None if b is None else self._moments(b, b.shape) for b in part.biases])

    def _plain_update(self, gi: int, params: list[nn.Parameter]) -> _PlainUpdate:
        """torch's own Adam/AdamW step (``torch.optim.adam.adam``) of one group's plain
        parameters, on copies of the parameters and their state."""
        group = self.param_groups[gi]
        states = [self.state.get(p, {}) for p in params]

        def old(st: dict, key: str, p: nn.Parameter) -> torch.Tensor:
            t = st.get(key)
            return (torch.zeros_like(p, memory_format=torch.preserve_format) if t is None
                    else t.clone())

        values = [p.detach().clone() for p in params]
        exp_avgs = [old(st, "exp_avg", p) for st, p in zip(states, params, strict=True)]
        exp_avg_sqs = [old(st, "exp_avg_sq", p) for st, p in zip(states, params, strict=True)]
        peaks = ([old(st, "max_exp_avg_sq", p) for st, p in zip(states, params, strict=True)]
                 if group["amsgrad"] else [])
        steps = [st["step"].clone() if "step" in st
                 else torch.tensor(0.0, dtype=_scalar_dtype()) for st in states]
        beta1, beta2 = group["betas"]
        torch_adam(values, [p.grad for p in params], exp_avgs, exp_avg_sqs, peaks, steps,
                   foreach=None, decoupled_weight_decay=group["decoupled_weight_decay"],
                   amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                   weight_decay=group["weight_decay"], eps=group["eps"],
                   maximize=group["maximize"])
        return _PlainUpdate(params, values, exp_avgs, exp_avg_sqs, peaks, steps)

    # ------------------------------------------------------------------ checks and refusal
    def _find_problems(self, parts: list[tuple[int, BoundBlock]],
                       plain: dict[int, list[nn.Parameter]]) -> list[tuple[int, str]]:
        """(group, description) of every non-finite input or zero designated weight."""
        found = []
        for _, part in parts:
            for layer, w, b, r in zip(part.block.layers, part.weights, part.biases, part.routes,
                                      strict=True):
                problem = layer_problem(layer, w, b, r)
                if problem:
                    found.append((part.group, problem))
        for gi, params in plain.items():
            found += [(gi, f"non-finite gradient for {self._names.get(id(p), '?')}")
                      for p in params if not torch.isfinite(p.grad).all()]
        return found

    def _find_overflow(self, parts: list[tuple[int, BoundBlock]], updates: list[AdamUpdate],
                       plain: dict[int, list[nn.Parameter]], plain_updates: list[_PlainUpdate]
                       ) -> list[tuple[int, str]]:
        """(group, description) of every parameter whose new value would not be finite."""
        def bad(ts: Iterable[torch.Tensor | None]) -> bool:
            return any(t is not None and not bool(torch.isfinite(t).all()) for t in ts)

        found = []
        for (_, part), up in zip(parts, updates, strict=True):
            for l, w in enumerate(part.weights):
                mw, mb = up.state.weights[l], up.state.biases[l]
                if bad([up.weights[l], up.biases[l], *(mw[1:] if mw else ()),
                        *(mb[1:] if mb else ())]):
                    found.append((part.group, "the step would write non-finite values for "
                                  f"{self._names.get(id(w), '?')}"))
        for (gi, _), up in zip(plain.items(), plain_updates, strict=True):
            for i, p in enumerate(up.params):
                if bad([up.values[i], up.exp_avgs[i], up.exp_avg_sqs[i],
                        *(up.max_exp_avg_sqs[i:i + 1])]):
                    found.append((gi, "the step would write non-finite values for "
                                  f"{self._names.get(id(p), '?')}"))
        return found

    def _refuse(self, problems: list[tuple[int, str]]) -> None:
        """Nothing was written: raise naming the first problem in a group with
        ``on_nonfinite="raise"``, else count a skipped step in every group."""
        for gi, problem in problems:
            if self.param_groups[gi]["on_nonfinite"] == "raise":
                raise NonFiniteError(f"{self._owner}: {problem}; the step was not taken "
                                     "(nothing was written); on_nonfinite='skip' skips such "
                                     "steps")
        for group in self.param_groups:
            group["skipped_steps"] += 1

    # ------------------------------------------------------------------ write
    def _write_block(self, k: int, part: BoundBlock, update: AdamUpdate) -> None:
        for w, new, m in zip(part.weights, update.weights, update.state.weights, strict=True):
            w.copy_(new.reshape(w.shape))
            self._keep(w, m)
        for b, new, m in zip(part.biases, update.biases, update.state.biases, strict=True):
            if b is not None:
                b.copy_(new)
                self._keep(b, m)
        first = self.state[self._blocks[k].weights[0]]
        first["clipped"] = first.get("clipped", 0) + int(update.clipped)  # a Python int

    def _keep(self, p: nn.Parameter, m: AdamMoments) -> None:
        """Store p's new moments in torch Adam's state layout (``step`` a 0-d tensor)."""
        st = self.state[p]
        st["step"] = torch.tensor(m.step, dtype=_scalar_dtype())
        st["exp_avg"] = m.exp_avg.reshape(p.shape)
        st["exp_avg_sq"] = m.exp_avg_sq.reshape(p.shape)
        if m.max_exp_avg_sq is not None:
            st["max_exp_avg_sq"] = m.max_exp_avg_sq.reshape(p.shape)

    def _write_plain(self, update: _PlainUpdate) -> None:
        for i, p in enumerate(update.params):
            p.copy_(update.values[i])
            st = self.state[p]
            st["step"] = update.steps[i]
            st["exp_avg"] = update.exp_avgs[i]
            st["exp_avg_sq"] = update.exp_avg_sqs[i]
            if update.max_exp_avg_sqs:
                st["max_exp_avg_sq"] = update.max_exp_avg_sqs[i]


class GAdamW(GAdam):
    r"""G-space AdamW: :class:`GAdam` with decoupled weight decay on basis-path values,

        v' = v (1 - lr * weight_decay) - lr * u      (u: Adam's direction of dL/dv)

    torch.optim.AdamW's defaults (``weight_decay=1e-2``); the decay acts on the positive basis
    paths only unless ``decay_carriers=True`` (see :class:`GAdam`). Parameters outside every
    G-block get torch AdamW.
    """

    _owner_name = "GAdamW"
    _plain_optimizer = "AdamW"

    def __init__(
        self,
        params: nn.Module | Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decay_carriers: bool = False,
        bp_norm: tuple[float, float] = (0.0, 0.0),
        max_ratio: float = 100.0,
        on_nonfinite: str = "raise",
        model: nn.Module | None = None,
        structure: Structure | None = None,
        batchnorm: str | None = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, decay_carriers=decay_carriers,
                         bp_norm=bp_norm, max_ratio=max_ratio, on_nonfinite=on_nonfinite,
                         model=model, structure=structure, batchnorm=batchnorm)
